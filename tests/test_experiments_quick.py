"""Every experiment script's --quick mode runs end to end and writes its JSON and plot.

The scripts are imported from bench/experiments and run through their ``main(argv)`` in
this process (no interpreter start-up per script), into a temporary directory.
"""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "bench" / "experiments"
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield {name: importlib.import_module(name) for name in ("lm", "diagnostic", "pinn", "vit")}
    finally:
        sys.path.remove(str(EXPERIMENTS))


def run(module, tmp_path, *extra):
    result = module.main(["--quick", "--out", str(tmp_path), "--no-progress", *extra])
    name = module.NAME
    saved = json.loads((tmp_path / f"{name}_quick.json").read_text())
    assert (tmp_path / f"{name}_quick.png").stat().st_size > 1000
    assert saved["experiment"] == name and saved["config_name"] == "quick"
    assert saved["versions"]["torch"] and saved["seeds"] == result["seeds"]
    return saved


def test_lm_quick(scripts, tmp_path):
    saved = run(scripts["lm"], tmp_path)
    assert saved["corpus"]["bytes"] == scripts["lm"].CONFIGS["quick"].corpus_bytes
    assert len(saved["corpus"]["sha256"]) == 64
    assert {(r["optimizer"], r["schedule"]) for r in saved["runs"]} == {
        (o, s) for o in ("trasmuon", "normuon", "muon", "adamw") for s in ("warmup", "no_warmup")}
    for r in saved["runs"]:
        assert len(r["train_loss"]) == scripts["lm"].CONFIGS["quick"].steps
        assert math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < 5.6  # < ln 256
    for schedule in ("warmup", "no_warmup"):
        metrics = saved["metrics"]["0"][schedule]["all"]
        assert all(s is not None for s in metrics["steps"].values())


def test_lm_corpus_option(scripts, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 2000)
    result = scripts["lm"].main(["--quick", "--out", str(tmp_path), "--no-progress", "--no-plot",
                                 "--corpus", str(corpus), "--optimizers", "trasmuon", "adamw",
                                 "--steps", "6"])
    assert result["corpus"]["source"] == str(corpus)
    assert result["corpus"]["bytes"] == corpus.stat().st_size
    assert len(result["runs"]) == 4 and all(len(r["train_loss"]) == 6 for r in result["runs"])


def test_diagnostic_quick(scripts, tmp_path):
    saved = run(scripts["diagnostic"], tmp_path)
    assert saved["normuon_vs_noclip"]["identical"]
    settings = {r["setting"] for r in saved["runs"]}
    assert settings == {"fix_V=True", "fix_V=False", "none"}
    bursty = [r for r in saved["runs"] if r["setting"] != "none"]
    assert all(r["burst_steps"] for r in bursty)
    row = saved["summary"][0]
    assert set(row["final_loss"]) == {"median", "q25", "q75", "iqr"}


def test_pinn_quick(scripts, tmp_path):
    saved = run(scripts["pinn"], tmp_path)
    assert {r["optimizer"] for r in saved["runs"]} == {"muon", "trasmuon", "normuon", "adamw"}
    for r in saved["runs"]:
        assert r["roi_events"] and math.isfinite(r["final_rel_l2"])


@pytest.mark.skipif(not FASHION.exists(), reason="dataset-fashion-mnist is not installed")
def test_vit_quick(scripts, tmp_path):
    saved = run(scripts["vit"], tmp_path)
    assert {r["bursts"] for r in saved["runs"]} == {False, True}
    for r in saved["runs"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert (r["n_burst_events"] > 0) == r["bursts"]
