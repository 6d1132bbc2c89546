"""Every experiment script's --quick mode runs end to end, writes its JSON and plot, and learns.

The scripts are imported from bench/experiments and run through their ``main(argv)`` in
this process (no interpreter start-up per script), into a temporary directory. Each
learning criterion is also run against the same script with ``--lr 0`` (a model that learns
nothing), which it must reject: the criteria can fail.
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


LN_256 = math.log(256)  # the loss of a uniform byte-level prediction


def lm_learned(run_result) -> bool:
    """Validation loss well below a uniform guess and training loss down by a third."""
    loss = run_result["train_loss"]
    return run_result["final_val_loss"] < 0.8 * LN_256 and loss[-1] < 0.67 * loss[0]


def diagnostic_learned(run_result) -> bool:
    """The regression loss (relative to its start, 1.0) more than a fifth lower."""
    return run_result["final_loss"] < 0.8


def pinn_learned(run_result) -> bool:
    """The relative L2 error at least 10% below the untrained net's."""
    return run_result["final_rel_l2"] < 0.9 * run_result["initial_rel_l2"]


def vit_learned(run_result) -> bool:
    """Test accuracy at least twice chance (10 classes). The quick run's 20 steps reach 0.29 to
    0.39 on Fashion-MNIST (and above 0.5 on the synthetic data of CI); an untrained one 0.05
    to 0.1."""
    return run_result["test_accuracy"] > 0.2


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
        (o, s) for o in ("trasmuon", "normuon", "muon", "namo", "namo_d", "adamw")
        for s in ("warmup", "no_warmup")}
    for r in saved["runs"]:
        assert len(r["train_loss"]) == scripts["lm"].CONFIGS["quick"].steps
        assert lm_learned(r), (r["optimizer"], r["schedule"], r["final_val_loss"])
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
    for r in saved["runs"]:
        assert diagnostic_learned(r), (r["optimizer"], r["setting"], r["final_loss"])


def test_pinn_quick(scripts, tmp_path):
    saved = run(scripts["pinn"], tmp_path)
    assert {r["optimizer"] for r in saved["runs"]} == {"muon", "trasmuon", "normuon", "namo",
                                                      "namo_d", "adamw"}
    for r in saved["runs"]:
        assert r["roi_events"] and pinn_learned(r), (r["optimizer"], r["final_rel_l2"])


def write_fake_fashion_mnist(directory: Path) -> Path:
    """Learnable synthetic images in Fashion-MNIST's gzipped idx format, for machines where
    the Debian package is not installed (CI): noise plus a bright 8x8 block whose position
    is the label, so the script's whole path runs and learning shows in the accuracy."""
    import gzip

    import torch

    directory.mkdir()
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 2048), ("t10k", 512)):
        labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
        images = torch.randint(0, 96, (n, 28, 28), generator=gen, dtype=torch.uint8)
        for i, label in enumerate(labels.tolist()):
            r, c = 2 + 12 * (label // 5), 1 + 5 * (label % 5)
            images[i, r : r + 8, c : c + 5] = 255
        for kind, data in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, data.ndim]) + b"".join(
                d.to_bytes(4, "big") for d in data.shape)
            with gzip.open(directory / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + data.numpy().tobytes())
    return directory


def test_vit_quick(scripts, tmp_path):
    extra = [] if FASHION.exists() else ["--data", str(write_fake_fashion_mnist(tmp_path / "data"))]
    saved = run(scripts["vit"], tmp_path, *extra)
    assert {r["bursts"] for r in saved["runs"]} == {False, True}
    for r in saved["runs"]:
        assert (r["n_burst_events"] > 0) == r["bursts"]
        assert vit_learned(r), (r["optimizer"], r["bursts"], r["test_accuracy"])


def test_the_learning_criteria_reject_a_model_that_learns_nothing(scripts, tmp_path):
    common = ["--quick", "--out", str(tmp_path), "--no-progress", "--no-plot", "--lr", "0"]
    lm = scripts["lm"].main([*common, "--optimizers", "trasmuon"])
    assert lm["runs"] and not any(lm_learned(r) for r in lm["runs"])
    diag = scripts["diagnostic"].main(common)
    assert not any(diagnostic_learned(r) for r in diag["runs"])
    pinn = scripts["pinn"].main([*common, "--optimizers", "trasmuon"])
    assert not any(pinn_learned(r) for r in pinn["runs"])
    data = FASHION.parent if FASHION.exists() else write_fake_fashion_mnist(tmp_path / "data")
    vit = scripts["vit"].main([*common, "--optimizers", "trasmuon", "--bursts", "off",
                               "--data", str(data)])
    assert not any(vit_learned(r) for r in vit["runs"])


def test_runs_write_outside_the_tracked_tree_by_default(scripts):
    common = sys.modules["_common"]
    args = common.finish_args(common.base_parser("x", [0], "lm").parse_args([]))
    for path in (args.out, args.plot_dir):
        assert path.resolve().is_relative_to(common.REPO / "out"), path
    assert "/out/" in (common.REPO / ".gitignore").read_text().split()


def test_vit_asks_for_missing_data_instead_of_installing_it(scripts, tmp_path, monkeypatch):
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError(f"the script ran a command: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    missing = tmp_path / "nothing-here"
    with pytest.raises(SystemExit, match="apt-get install -y dataset-fashion-mnist"):
        scripts["vit"].ensure_data(missing)
