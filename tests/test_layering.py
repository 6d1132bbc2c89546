"""Layering: the optimizers import and run their eager backend without triton (an optional
extra), and ``backend="triton"`` then says what to install. (That ``trasmuon_kernels`` imports
nothing of ``trasmuon`` is tests/kernels/test_launch_plans.py's.)"""

import subprocess
import sys
import textwrap


def test_without_triton_the_eager_backend_runs_and_triton_says_what_to_install():
    code = textwrap.dedent('''
        import sys

        class NoTriton:  # as if triton were not installed
            def find_spec(self, name, path, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("No module named 'triton'")

        sys.meta_path.insert(0, NoTriton())
        import torch
        import trasmuon

        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
        for cls in (trasmuon.TrasMuon, trasmuon.NAMOD, trasmuon.Muon, trasmuon.AdamW):
            opt = cls(trasmuon.split_params(model))
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        assert "triton" not in sys.modules
        try:
            trasmuon.TrasMuon(model.parameters(), backend="triton")
        except RuntimeError as e:
            assert "pip install triton" in str(e), e
        else:
            raise AssertionError("backend='triton' without triton was accepted")
        print("ok")
    ''')
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
