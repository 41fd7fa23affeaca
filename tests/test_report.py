"""`report RUN_DIR` / `report SWEEP_DIR` and the analysis API, on tiny real runs through the CLI."""

import math
import os

import pytest

from lightning_entropy.__main__ import main
from lightning_entropy.analysis import load_run, load_sweep
from lightning_entropy.diagnostics import fit_entropy_law
from lightning_entropy.report import law_fit, law_points, read_metrics
from lightning_entropy.sweep import run_sweep

from .conftest import TINY

PNG = b"\x89PNG\r\n\x1a\n"
DIAG = [
    "diagnostics.entropy_change=true",
    "diagnostics.entropy_change_every=1",
    "diagnostics.effective_rank=true",
    "diagnostics.effective_rank_every=1",
    "diagnostics.logit_lens=true",
    "diagnostics.logit_lens_every=1",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_cache):
    root = tmp_path_factory.mktemp("runs")
    # the untrained test policy earns no exact-match reward; EM-RL's reward (minus the response's
    # entropy) gives every group non-zero advantages, so the entropy change has something to predict
    args = [
        "fit",
        *TINY,
        "reward.name=em_rl",
        "trainer.max_steps=5",
        "logging.val_every=1",
        *DIAG,
        f"logging.root={root}",
        "logging.name=r",
    ]
    assert main(args) == 0
    return root / "r"


def test_report_writes_markdown_and_every_figure(run_dir, capsys):
    assert main(["report", str(run_dir), "--law-fit-points", "3"]) == 0
    assert "report.md" in capsys.readouterr().out
    md = (run_dir / "report.md").read_text()
    for section in (
        "## Summary",
        "## Entropy-performance law",
        "## Measured vs predicted entropy change",
        "## Figures",
    ):
        assert section in md
    for name in ("entropy", "entropy_change", "law", "pass_at_k", "answers", "hidden"):
        png = run_dir / f"report_{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000, name
        assert f"]({png.name})" in md
    # the law row: fitted on the first 3 of the 6 validations (steps 0..5), RMSE on the other 3
    series = read_metrics(run_dir)
    assert "| val/acc |" in md and "3 of 6 validations" in md
    pts = law_points(series, "val/acc")
    assert [s for s, _, _ in pts] == [0, 1, 2, 3, 4, 5]
    # a validation at step s pairs with step s's rollout; the last one (after the last rollout) with step 4
    entropy = dict(series["train/entropy"])
    assert [h for _, h, _ in pts] == [entropy[s] for s in (0, 1, 2, 3, 4, 4)]
    fit = law_fit(series, "val/acc", 3)
    a, b = fit_entropy_law([h for _, h, _ in pts[:3]], [r for _, _, r in pts[:3]])
    assert (math.isnan(fit["a"]) and math.isnan(a)) or fit["a"] == pytest.approx(a)


def test_logged_diagnostics_and_running_correlation(run_dir):
    series = read_metrics(run_dir)
    measured, pred = dict(series["diag/dH_measured"]), dict(series["diag/dH_pred_cov"])
    assert sorted(measured) == [0, 1, 2, 3, 4]  # every step (entropy_change_every=1)
    # the logged running correlation at the last step is the correlation over every step so far
    xs, ys = [pred[s] for s in range(5)], [measured[s] for s in range(5)]
    mx, my = sum(xs) / 5, sum(ys) / 5
    cxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    vx, vy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    assert vx > 0 and vy > 0
    assert dict(series["diag/corr_cov"])[4] == pytest.approx(cxy / math.sqrt(vx * vy), rel=1e-4, abs=1e-6)
    assert dict(series["diag/slope_cov"])[4] == pytest.approx(cxy / vx, rel=1e-4)
    for k in ("val/pass@1", "val/pass@2", "val/pass@3", "val/pass@4", "val/support", "val/effective_rank"):
        assert k in series, k
    assert {"val/lens_entropy_layer1", "val/lens_entropy_layer2"} <= set(series)
    # pass@4 with 4 samples is the share of problems solved at least once: the support
    assert dict(series["val/pass@4"])[5] == pytest.approx(dict(series["val/support"])[5])
    assert "law/acc_a" in series and dict(series["law/points"])[4] == 5  # steps 0..4 paired online


def test_load_run_is_a_tidy_table_with_config_columns(run_dir):
    df = load_run(run_dir)
    assert {"run", "step", "metric", "value", "optim.lr", "loss.name", "diagnostics.entropy_change"} <= set(
        df.columns
    )
    ent = df[df.metric == "train/entropy"].sort_values("step")
    assert list(zip(ent.step, ent.value)) == pytest.approx(read_metrics(run_dir)["train/entropy"])
    assert set(df["loss.name"]) == {"ppo"} and set(df["optim.lr"]) == {1e-4}
    with pytest.raises(FileNotFoundError, match="no logs"):
        load_run(run_dir / "checkpoints")


def test_load_run_without_pandas_returns_columns(run_dir, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pandas(name, *a, **kw):
        if name == "pandas":
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    table = load_run(run_dir)
    assert isinstance(table, dict) and len(set(map(len, table.values()))) == 1
    rows = [i for i, m in enumerate(table["metric"]) if m == "train/reward"]
    assert [table["step"][i] for i in rows] == [0, 1, 2, 3, 4]


def test_sweep_report_overlays_points_with_seed_bands(tmp_path, tiny_cache, capsys):
    overrides = ", ".join(f"'{o}'" for o in [*TINY, "trainer.max_steps=2", "logging.val_every=1"])
    f = tmp_path / "grid.yaml"
    f.write_text(
        f"name: tiny\noverrides: [{overrides}]\nseeds: [0, 1]\ngrid:\n  advantage.name: [grpo, rloo]\n"
    )
    os.environ.pop("LIGHTNING_ENTROPY_RUN_NAME", None)
    assert run_sweep(f, root=str(tmp_path / "out")) == 0
    out = tmp_path / "out" / "tiny"
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert (out / "report_overlay.png").read_bytes()[:8] == PNG
    assert "| grpo | 2/2 |" in md and "| rloo | 2/2 |" in md
    sw = load_sweep(out)
    assert set(sw.point) == {"grpo", "rloo"} and set(sw.seed) == {0, 1}
    assert set(sw["advantage.name"]) == {"grpo", "rloo"}
    # the table's mean ± std over seeds of the final entropy
    finals = sw[(sw.metric == "train/entropy") & (sw.point == "grpo") & (sw.step == 1)].value.tolist()
    mean = sum(finals) / 2
    std = math.sqrt(sum((v - mean) ** 2 for v in finals))
    assert f"| grpo | 2/2 | {mean:.4f} ± {std:.4f} |" in md


def test_report_refuses_a_law_fit_on_fewer_than_two_points(run_dir, capsys):
    assert main(["report", str(run_dir), "--law-fit-points", "1"]) == 2
    assert "--law-fit-points=1" in capsys.readouterr().err
