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


def write_fake_fashion_mnist(directory: Path) -> Path:
    """Random images and labels in Fashion-MNIST's gzipped idx format, for machines where
    the Debian package is not installed (CI): the script's whole path still runs."""
    import gzip

    import torch

    directory.mkdir()
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 512), ("t10k", 256)):
        images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
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
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert (r["n_burst_events"] > 0) == r["bursts"]
