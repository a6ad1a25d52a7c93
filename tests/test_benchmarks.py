"""Smoke test of benchmarks/bench_overhead.py: it runs end to end on a tiny model and writes sane JSON (no timing checks)."""

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_overhead.py"
VARIANTS = ["native", "cli"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Runs the script's entry point in this process (the interpreter's torch / transformers imports are shared)."""
    out = tmp_path_factory.mktemp("bench") / "report.json"
    argv = [
        "--tiny", "--repeats", "1", "--json", str(out), "--crops", "2,4", "--batch-sizes", "2",
        "--sizes", "384x384+600x900", "--variants", ",".join(VARIANTS), "--profile-repeats", "1",
        "--threads", "1",  # tiny matmuls: one thread is fastest, and steady on a shared machine
    ]
    spec = importlib.util.spec_from_file_location("bench_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    verbosity, rng_state, threads = hf_logging.get_verbosity(), torch.get_rng_state(), torch.get_num_threads()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            returned = module.main(argv)
    finally:
        hf_logging.set_verbosity(verbosity)
        torch.set_rng_state(rng_state)
        torch.set_num_threads(threads)
        sys.modules.pop(spec.name, None)
    assert "prefill" in stdout.getvalue()
    written = json.loads(out.read_text())
    assert written["results"] and len(written["results"]) == len(returned["results"])
    return written


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_report_header(report):
    for key in ("machine", "device", "dtype", "threads", "torch", "new_tokens", "repeats", "dims", "parameters"):
        assert key in report
    assert report["variants"] == VARIANTS
    params = report["parameters"]
    assert params["cli"] == params["native"] + params["added"]
    assert params["added"] == params["amp"] + params["agf"] > 0
    assert 0 < params["added_ratio"] < 1


def test_every_case_has_sane_figures(report):
    cases = [(r["scenario"], r["batch_size"]) for r in report["results"]]
    assert cases == [("crops=2", 2), ("crops=4", 2), ("384x384+600x900", 1)]
    for result in report["results"]:
        assert result["crops_per_sample"] >= 1
        assert 0 < result["image_tokens_per_sample"] < result["seq_len"]
        assert result["mean_abs_gate"] > 0  # the injection really ran
        for name in VARIANTS:
            figures = result[name]
            for key in ("prefill_s", "decode_s_per_token", "peak_bytes_beyond_weights"):
                assert positive(figures[key]), (result["scenario"], name, key, figures[key])
            assert len(figures["prefill_s_runs"]) == report["repeats"]
        assert all(positive(v) for v in result["ratio"]["cli"].values())
        assert "cli_proposed_max_abs_logit_diff" not in result


def test_crop_scaling_and_multi_image_token_counts(report):
    by_case = {(r["scenario"], r["batch_size"]): r for r in report["results"]}
    side = report["dims"]["image_size"] // report["dims"]["patch_size"]
    assert by_case[("crops=2", 2)]["crops_per_sample"] == 2  # one tile + the base view
    assert by_case[("crops=2", 2)]["image_tokens_per_sample"] == side * side + side * (side + 1)
    assert by_case[("crops=4", 2)]["crops_per_sample"] == 4  # 1 x 3 tiles + the base view
    assert by_case[("crops=4", 2)]["image_tokens_per_sample"] == side * side + side * (3 * side + 1)
    assert by_case[("384x384+600x900", 1)]["crops_per_sample"] == 2  # multi-image: the base view of each image
    assert by_case[("384x384+600x900", 1)]["image_tokens_per_sample"] == 2 * (side * side + 1)


def test_flops_and_memory_floor(report):
    for result in report["results"]:
        for flops in (result["flops"], result["flops_real_7b"]):
            assert all(positive(v) for v in flops["native"].values())
            assert all(v >= 0 for v in flops["cli_extra"].values()) and flops["cli_extra"]["total"] > 0
            assert flops["ratio"] == pytest.approx(
                (flops["native"]["total"] + flops["cli_extra"]["total"]) / flops["native"]["total"]
            )
        assert result["memory_floor_bytes"] > 0 and result["memory_floor_ratio"] > 1
    # more image tokens -> more extra FLOPs, more memory floor
    by_case = {(r["scenario"], r["batch_size"]): r for r in report["results"]}
    small, large = by_case[("crops=2", 2)], by_case[("crops=4", 2)]
    assert large["flops"]["cli_extra"]["total"] > small["flops"]["cli_extra"]["total"]
    assert large["memory_floor_bytes"] > small["memory_floor_bytes"]


def test_stage_profile_at_batch_one(report):
    for result in report["results"]:
        if result["batch_size"] != 1:
            assert "stage_profile_s" not in result
            continue
        stages = result["stage_profile_s"]
        assert stages["decoder layers"]["native"] > 0 and stages["vision tower"]["native"] > 0
        assert stages["AGF (gates + injection)"]["native"] == 0 < stages["AGF (gates + injection)"]["cli"]
        assert all(v >= 0 for values in stages.values() for v in values.values())
        # the timing wrappers hook the current model's stages (pack_into, projector, AMP, AGF), each timed
        for stage in ("vision tower", "projector", "packing", "decoder layers"):
            assert stages[stage]["cli"] > 0, stage
        assert stages["AMP LoRA"]["native"] == 0 < stages["AMP LoRA"]["cli"]
        assert positive(result["prefill_ratio_from_stages"]["cli"])
        assert result["decode_extra_aten_ops"] == {"cli": {}}  # decode runs the native ops only


def test_only_native_and_cli_variants():
    spec = importlib.util.spec_from_file_location("bench_overhead_args", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.parse_args(["--variants", "native,cli"]).variants == VARIANTS
    for bad in ("native,cli,cli_proposed", "cli", "native,cli,cli"):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            module.parse_args(["--variants", bad])
