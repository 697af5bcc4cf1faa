"""``colorquant reproduce``: the smoke preset end to end on real CIFAR-10 images (every stage runs,
the report gathers the evaluate stages), then a second call that finds everything done, and an
interrupted stage that resumes."""

import json

import pytest
from PIL import Image

from colorquant_ops.experiment import cli
from colorquant_ops.experiment.presets import (COMPACT_STAGE, GUMBEL_KS, PLUS_STAGE, PRESETS, SHEET_CLASSES,
                                              data_warning, final_run, gumbel_stage)
from colorquant_ops.experiment.quantize_files import COMPARISON_COLUMNS


def _reproduce(out, *extra) -> int:
    return cli.main(["reproduce", "--preset", "smoke", "--out-dir", str(out), "--device", "cpu", "--no-progress",
                     *extra])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "smoke"
    assert _reproduce(out) == 0
    return out


def test_dry_run_runs_nothing(tmp_path, capsys):
    assert _reproduce(tmp_path / "dry", "--dry-run") == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "dry").exists()
    stages = PRESETS["smoke"].stages
    assert printed.count("[  todo] colorquant ") == len(stages)
    for stage in stages:
        assert f"--out-dir {tmp_path / 'dry' / stage.name}" in printed


def test_every_stage_ran_and_the_report_gathers_them(smoke_run):
    for stage in PRESETS["smoke"].stages:
        assert (smoke_run / stage.name / stage.done_marker()).is_file(), stage.name
    report = smoke_run / "report"
    rows = json.loads((report / "results.json").read_text())["rows"]
    cells = {(r["method"], r["dither"], r["num_colors"]) for r in rows}
    for k in (2, 4):  # the smoke preset's K
        assert ("colorcnn", "off", k) in cells
        for method in ("median_cut", "octree", "pil_kmeans", "kmeans"):
            assert {(method, "off", k), (method, "on", k)} <= cells
    assert sum(r["method"] == "full colour" for r in rows) == 1  # measured by both stages, reported once
    assert any(r["method"] == "jpeg" for r in rows)
    table = (report / "results.md").read_text()
    assert "| colorcnn |" in table and "| kmeans + dither |" in table and "| full colour |" in table
    # the paper's comparison (its k-means: pil_kmeans) first; the library's k-means++ apart, after it
    paper, library = table.split("Not in the paper: kmeans")
    assert "| pil_kmeans + dither |" in paper and "| colorcnn |" in paper and "| kmeans" not in paper
    assert "| kmeans |" in library and "| kmeans + dither |" in library and "pil_kmeans |" not in library
    # no --data-root: the data is the JPEG copy, and both report files say so at their head
    warning = data_warning(None)
    assert warning.startswith("WARNING: no --data-root: CIFAR-10 comes from the project's JPEG copy")
    assert table.startswith(f"**{warning}**")
    assert json.loads((report / "results.json").read_text())["data_warning"] == warning
    for name in ("accuracy_vs_bits.png", "accuracy_vs_bpp.png"):
        assert Image.open(report / name).size[0] > 100
    # Picture sheet: one row per image and K (2 and 4 here), a column per method plus the original.
    sheet = Image.open(report / "sheet-1-2-3-bits.png")
    assert sheet.size[0] > sheet.size[1] / (2 * len(SHEET_CLASSES)) * len(COMPARISON_COLUMNS)


def test_second_call_skips_done_stages_and_resumes_interrupted_ones(smoke_run, capsys):
    stage = smoke_run / "colorcnn-k4"
    (stage / "final.pt").unlink()  # as if stopped after its last checkpoint
    before = (smoke_run / "colorcnn-k2" / "final.pt").stat().st_mtime_ns
    assert _reproduce(smoke_run) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == data_warning(None)  # the run's first line
    assert "[resume] colorquant train" in printed and "--resume" in printed
    assert printed.count("[  done]") == len(PRESETS["smoke"].stages) - 1
    assert (stage / "final.pt").is_file()
    assert (smoke_run / "colorcnn-k2" / "final.pt").stat().st_mtime_ns == before


def test_no_data_warning_with_a_data_root(tmp_path, capsys):
    assert data_warning(tmp_path) is None
    assert _reproduce(tmp_path / "dry", "--dry-run", "--data-root", str(tmp_path)) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_the_paper_preset_trains_the_classifier_with_the_one_cycle_schedule():
    argv = {s.name: s.argv for s in PRESETS["cifar10-paper"].stages}["classifier"]
    assert argv[argv.index("--schedule") + 1] == "onecycle" and "--lr-steps" not in argv
    for preset in ("cifar10-cpu-alexnet", "smoke"):  # as they ran before --schedule: their runs resume
        argv = {s.name: s.argv for s in PRESETS[preset].stages}["classifier"]
        assert argv[argv.index("--schedule") + 1] == "step"


def _parsed_train(argv):
    import argparse

    from colorquant_ops.experiment import train

    parser = argparse.ArgumentParser()
    train.COLORCNN_COMMAND.add_arguments(parser)
    return vars(parser.parse_args(list(argv[1:]) + ["--out-dir", "run"]))


@pytest.mark.parametrize("start, lr, epochs, more", [
    *((f"colorcnn-k{k}", 0.005, 12 if k == 2 else 6, {}) for k in GUMBEL_KS),
    (COMPACT_STAGE, 0.005, 6, {"boundary": 5.0}),  # with a heavier boundary term
    (PLUS_STAGE, 0.015, 4, {}),
])
def test_the_cpu_preset_fine_tunes_its_bundled_networks_with_gumbel_noise(start, lr, epochs, more):
    """Each ``-gumbel`` stage is the stage it starts from, from that stage's weights, with the noise, half
    its lr and ``epochs`` epochs in one cycle (and ``more``): the options a user's train command would
    parse to say so."""
    from colorquant_ops.experiment import demo

    stages = {s.name: s.argv for s in PRESETS["cifar10-cpu"].stages}
    names = list(stages)
    assert set(demo.DEMO_KS) <= set(GUMBEL_KS)  # rebuild_assets bundles these stages' networks
    tuned = gumbel_stage(start)
    assert names.index(tuned) > names.index(start)  # it starts from that run
    got, base = _parsed_train(stages[tuned]), _parsed_train(stages[start])
    assert float(base["lr"]) == 2 * lr
    assert got == {**base, "init_from": f"{{out}}/{start}/final.pt", "logit_noise": 1.0, "lr": lr, "epochs": epochs,
                   "restart_epochs": epochs, **more}


def test_the_cpu_preset_evaluates_its_gumbel_networks_first():
    stages = {s.name: s.argv for s in PRESETS["cifar10-cpu"].stages}
    evaluate = list(stages["evaluate-colorcnn"])
    ckpts = evaluate[evaluate.index("--colorcnn") + 1:evaluate.index("--colorcnn-plus")]
    # per K the first checkpoint is the row without a variant label: the Gumbel one where there is one
    firsts = {}
    for path in ckpts:
        k = int(path.split("colorcnn-k")[1].split("-")[0].split("/")[0])
        firsts.setdefault(k, path)
    for k in GUMBEL_KS:
        assert firsts[k] == f"{{out}}/colorcnn-k{k}-gumbel/final.pt" and f"{{out}}/colorcnn-k{k}/final.pt" in ckpts
    assert firsts[16] == "{out}/colorcnn-k16/final.pt"
    for run in (gumbel_stage(COMPACT_STAGE), COMPACT_STAGE):
        assert f"{{out}}/{run}/final.pt" in ckpts
    assert evaluate[evaluate.index("--colorcnn-plus") + 1] == f"{{out}}/{PLUS_STAGE}-gumbel/final.pt"


def test_final_run_prefers_the_gumbel_stage():
    names = [s.name for s in PRESETS["cifar10-cpu"].stages]
    assert final_run("colorcnn-k2", names) == "colorcnn-k2-gumbel"
    assert final_run("colorcnn-k16", names) == "colorcnn-k16"
    assert final_run(PLUS_STAGE, names) == "colorcnn-plus-gumbel"
    assert final_run(PLUS_STAGE, [s.name for s in PRESETS["cifar10-cpu-alexnet"].stages]) == PLUS_STAGE


def test_the_cpu_preset_trains_and_evaluates_a_compact_k2_network():
    stages = {s.name: s.argv for s in PRESETS["cifar10-cpu"].stages}
    compact, plain = stages[COMPACT_STAGE], stages["colorcnn-k2"]
    # the plain K = 2 stage's command with the boundary term and 12 epochs (the bundled
    # cifar10-k2-compact's recipe)
    rest = list(compact)
    i = rest.index("--boundary")
    assert rest[i + 1] == "2"
    del rest[i:i + 2]
    for flag in ("--epochs", "--restart-epochs"):
        assert rest[rest.index(flag) + 1] == "12" and plain[plain.index(flag) + 1] == "6"
    assert [a for a in rest if a != "12"] == [a for a in plain if a != "6"]
    evaluate = stages["evaluate-colorcnn"]
    assert f"{{out}}/{COMPACT_STAGE}/final.pt" in evaluate and "{out}/colorcnn-k2/final.pt" in evaluate
