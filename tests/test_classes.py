"""Each optimizer class's constructor follows its rule's hyperparameter table
(``trasmuon.rules``): every hyperparameter a group of the class's matrix rule holds is a
keyword argument (except the ``per_group`` ones: a param's layout and blocks), with the
rule's default, and so are the keys of the class's AdamW params (``fallback_hyperparameters``);
nothing else but the options. A new hyperparameter in a table fails here until the classes
whose rule has it take it."""

from __future__ import annotations

import inspect

import pytest
import torch

import trasmuon
from trasmuon.optimizer import OPTIONS
from trasmuon.rules import get_rule

CLASSES = (trasmuon.TrasMuon, trasmuon.NorMuon, trasmuon.Muon, trasmuon.NAMO, trasmuon.NAMOD,
           trasmuon.AdamW)


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_the_signature_is_the_rule_table(cls):
    rule = get_rule(cls.matrix_rule)
    table = {hp.name: hp for hp in (*rule.hyperparameters, *cls.fallback_hyperparameters)
             if not hp.per_group}
    params = dict(inspect.signature(cls.__init__).parameters)
    assert list(params)[:2] == ["self", "params"]
    arguments = {k: p for k, p in params.items() if k not in ("self", "params", *OPTIONS)}
    assert set(arguments) == set(table), (set(arguments) ^ set(table))
    wrong = [k for k, p in arguments.items() if not _same(p.default, table[k].default)]
    assert not wrong, [(k, arguments[k].default, table[k].default) for k in wrong]
    assert set(OPTIONS) <= set(params)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_argument_reaches_the_groups(cls):
    # A value given for each hyperparameter is what the group holds (constructor_arguments).
    rule = get_rule(cls.matrix_rule)
    p = torch.nn.Parameter(torch.randn(4, 6))
    given = {"lr": 0.0123, "weight_decay": 0.0321}
    opt = cls([p], **given)
    group = opt.param_groups[0]
    assert {k: group[k] for k in given} == given
    keys = {hp.name for hp in rule.hyperparameters}
    assert keys <= set(group)
    assert opt._explicit == frozenset(given)
