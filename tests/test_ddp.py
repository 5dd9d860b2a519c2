"""All three checks together under `strategy="ddp"` with two CPU processes: one verdict on every rank,
printed once (rank zero), and a failing check stops every rank without a hang."""

from __future__ import annotations

from tests.ddp import run_ddp

ALL = ["InitLossCheck", "OverfitOneBatch", "BatchLeakageProbe"]


def test_all_checks_pass_on_every_rank_and_report_once(tmp_path):
    code, ranks, output = run_ddp(tmp_path, "tests.zoo:BatchNormCNN", "tests.zoo:shapes", ALL)
    assert code == 0, output[-4000:]
    assert set(ranks) == {0, 1}
    for rank in ranks.values():
        assert rank["error"] is None
        assert [r["status"] for r in rank["results"]] == ["passed"] * 3, rank["results"]
        assert rank["global_step"] == 2
    assert [r["summary"] for r in ranks[0]["results"]] == [r["summary"] for r in ranks[1]["results"]]
    for name in ALL:
        assert output.count(f"[lightning_recipe] {name}: PASSED") == 1, output[-4000:]


def test_a_failing_check_stops_every_rank_with_the_same_verdict(tmp_path):
    code, ranks, output = run_ddp(tmp_path, "tests.zoo:ViewInsteadOfPermute", "tests.zoo:sequences", ALL)
    assert code != 0
    assert set(ranks) == {0, 1}, output[-4000:]
    for rank in ranks.values():
        assert rank["error"] == "RecipeCheckError", rank
        assert rank["global_step"] == 0
    assert ranks[0]["message"] == ranks[1]["message"]
    assert "BatchLeakageProbe" in ranks[0]["message"]
