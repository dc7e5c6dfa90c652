"""`qwen3next inspect --plan`: the plan shown is the plan load() builds, the prediction's arithmetic, the
calibration cache, bad inputs. No timing is asserted: measurements are replaced by fixed figures."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from checkpoints import budget_for_slots
from qwen3next.offload import forecast
from qwen3next.offload.placement import Placement
from qwen3next.offload.router_stats import RouterStatistics
from test_cli import run_cli

DISK, RAM = 1.0e9, 20.0e9  # the fixed "measured" speeds, bytes/s


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory):
    """The small fixture model at 4 bits: 16 experts top-4 in 8 layers, plus the MTP layer's (144 experts)."""
    from qwen3next.quant.convert import quantize_checkpoint
    from qwen3next.quant.policy import Policy

    folder = tmp_path_factory.mktemp("forecast") / "q4"
    quantize_checkpoint(models("small"), folder, Policy(4), progress=False)
    return folder


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Measurements counted and replaced by DISK and RAM; the calibration cache in a folder of the test's own."""
    calls = []
    monkeypatch.setattr(forecast, "measure_speeds", lambda fplan: calls.append(fplan.folder) or (DISK, RAM))
    monkeypatch.setattr(forecast, "calibration_file", lambda: tmp_path / "cache" / "calibration.json")
    return calls


@pytest.fixture
def cli(capsys):
    """The CLI in-process: (exit code, stdout, stderr) of that call alone."""
    def call(*args):
        capsys.readouterr()  # what came before (a load's notices) is not this call's
        return run_cli([str(a) for a in args], capsys=capsys)

    return call


def plan_json(cli, folder, *flags) -> dict:
    code, out, err = cli("inspect", folder, "--plan", "--json", "-q", *flags)
    assert code == 0 and err == "", err
    return json.loads(out)


def budget_for(folder, slots: int) -> int:
    return budget_for_slots(folder, slots, max_context=64)


@pytest.mark.parametrize("slots, max_context", [(4, 64), (7, 64), (12, None), (None, None)])
def test_the_plan_shown_is_the_plan_load_builds(cli, quantized, measured, slots, max_context):
    """4 slots: one step's read buffers only. Where load() refuses the flags, --plan refuses them alike."""
    import qwen3next
    from qwen3next.errors import RequestError

    cpu_mem = "1G" if slots is None else budget_for(quantized, slots)
    flags = ["--cpu-mem", cpu_mem] + ([] if max_context is None else ["--max-context", max_context])
    code, out, err = cli("inspect", quantized, "--plan", "--json", "-q", *flags)
    try:
        engine = qwen3next.load(quantized, cpu_mem=cpu_mem, max_context=max_context, router_stats=False, quiet=True)
    except RequestError as exc:
        assert code == 2 and exc.rule in err
        return
    with engine:
        built = dataclasses.asdict(engine.plan)
        assert code == 0 and engine.expert_store.cache.slot_count == json.loads(out)["plan"]["slots"]
    shown = json.loads(out)["plan"]
    assert {key: shown[key] for key in built} == built
    assert shown["fully_resident"] == (slots is None) and shown["slots"] + shown["on_disk_experts"] == 144


def test_the_json_shape_and_the_prediction(cli, quantized, measured):
    report = plan_json(cli, quantized, "--cpu-mem", budget_for(quantized, 12), "--max-context", 64)
    assert set(report) == {"path", "plan", "slots", "forecast"} and report["path"] == str(quantized)
    plan, slots, predicted = report["plan"], report["slots"], report["forecast"]
    assert (plan["device"], plan["dtype"], plan["budget_from"], plan["loads_whole"]) == \
        ("cpu", "bfloat16", "--cpu-mem", False)
    assert plan["slots"] == 12 and plan["experts"] == 144 and plan["resident_share"] == 12 / 144
    assert plan["on_disk_bytes"] == 132 * plan["slot_bytes"] and plan["slots_bytes"] == 12 * plan["slot_bytes"]
    assert slots == {"layers": 9, "decode_layers": 8, "experts_per_layer": 16, "slots": 12, "scope": "shared",
                     "average_per_layer": 12 / 9}
    # uniform routing: the 12 slots serve 12 of the 8 decode layers' 128 experts
    assert predicted["hit_rate"] == 12 / 128 and predicted["hit_rate_from"] == "uniform routing"
    chosen = 8 * 4 * plan["slot_bytes"]
    assert predicted["disk_bytes_per_token"] == round(chosen * 116 / 128)
    fplan = forecast.plan_folder(quantized, Placement(cpu_mem="1G"))
    assert predicted["ram_bytes_per_token"] == fplan.dense_read_bytes + chosen
    seconds = predicted["ram_bytes_per_token"] / RAM + predicted["disk_bytes_per_token"] / DISK
    assert predicted["tokens_per_second"] == pytest.approx(1 / seconds)
    assert (predicted["ram_bytes_per_second"], predicted["disk_bytes_per_second"]) == (RAM, DISK)
    assert predicted["calibration"]["cached"] is False and len(measured) == 1


def test_the_tables(cli, quantized, measured):
    code, out, err = cli("inspect", quantized, "--plan", "--cpu-mem", budget_for(quantized, 12), "--max-context", 64)
    assert code == 0 and "calibrating" in err
    for title in ("memory plan", "expert slots per layer", "predicted decode speed"):
        assert f"\n{title}\n" in f"\n{out}", title
    assert "12 slots of" in out and "8% of 144 experts" in out and "132 experts, read when routed" in out
    assert "-token prefill chunks" in out
    assert "shared across 9 layers (8 routed at decode, 1 MTP)" in out and "1.3  of 16 experts each" in out
    assert "uniform routing" in out and "tok/s" in out


def test_the_decode_reads_one_embedding_row_and_no_mtp(quantized, measured):
    from qwen3next.checkpoint_names import has_mtp, meta_model
    from qwen3next.offload.placement import dense_bytes
    from qwen3next.weights import CheckpointReader

    fplan = forecast.plan_folder(quantized, Placement(cpu_mem="1G"))
    with CheckpointReader(quantized) as reader:
        names = list(meta_model(fplan.config, has_mtp(reader.names())).state_dict())
        table = dense_bytes(reader, [forecast.EMBEDDING], torch.bfloat16)
        main = dense_bytes(reader, [n for n in names if not n.startswith("mtp.")], torch.bfloat16)
    assert fplan.dense_read_bytes == main - table + table // fplan.config.vocab_size
    assert fplan.decode_layers == tuple(range(8)) and list(fplan.prefixes) == list(range(9))


def test_router_statistics_give_the_hottest_experts_that_fit():
    uniform = forecast.hit_rate(3, (0, 1), experts=4, top_k=1, statistics=None)
    assert uniform == (3 / 8, 0)
    stats = RouterStatistics(layers=3, experts=4, top_k=1, main_layers=2)
    stats.routed(0, torch.tensor([[0], [0], [0], [1]]))
    stats.fold()
    # layer 0: chances 0.75, 0.25, 0, 0; layer 1 uncounted: 0.25 each. Two slots hold 0.75 + 0.25 of 2 lookups
    assert forecast.hit_rate(2, (0, 1), experts=4, top_k=1, statistics=stats) == (0.5, 4)
    assert forecast.hit_rate(100, (0, 1), experts=4, top_k=1, statistics=stats) == (1.0, 4)


def test_the_calibration_is_measured_once_and_reused(quantized, measured, capsys):
    fplan = forecast.plan_folder(quantized, Placement(cpu_mem="1G"))
    first = forecast.calibrate(fplan, quiet=False)
    again = forecast.calibrate(fplan)
    assert len(measured) == 1 and not first.cached and again.cached
    assert (again.disk_bytes_per_second, again.ram_bytes_per_second, again.measured) == (DISK, RAM, first.measured)
    assert "calibrating" in capsys.readouterr().err
    assert not forecast.calibrate(fplan, recalibrate=True).cached and len(measured) == 2
    saved = json.loads(forecast.calibration_file().read_text())
    assert list(saved["entries"]) == [forecast.calibration_key(fplan)]


@pytest.mark.parametrize("content", ["not json", "[]", '{"version": 99}', '{"version": 1, "entries": []}',
                                     '{"version": 1, "entries": {"KEY": 3}}',
                                     '{"version": 1, "entries": {"KEY": {"disk_bytes_per_second": "fast", '
                                     '"ram_bytes_per_second": 1, "measured": ""}}}'])
def test_a_damaged_calibration_file_is_measured_over(quantized, measured, content):
    fplan = forecast.plan_folder(quantized, Placement(cpu_mem="1G"))
    forecast.calibration_file().parent.mkdir(parents=True)
    forecast.calibration_file().write_text(content.replace("KEY", forecast.calibration_key(fplan)))
    assert not forecast.calibrate(fplan).cached and forecast.calibrate(fplan).cached


def test_an_unwritable_cache_folder_skips_saving_with_one_note(quantized, measured, monkeypatch, tmp_path, capsys):
    (tmp_path / "a file").write_text("")
    monkeypatch.setattr(forecast, "calibration_file", lambda: tmp_path / "a file" / "calibration.json")
    fplan = forecast.plan_folder(quantized, Placement(cpu_mem="1G"))
    assert forecast.calibrate(fplan).disk_bytes_per_second == DISK
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot save" in err[0] and "measured again next time" in err[0]
    assert not forecast.calibrate(fplan).cached and len(measured) == 2


@pytest.mark.parametrize("name", ["quantized", "unquantized"])
def test_the_measurements_run_on_the_folder(quantized, models, name):
    """The real probes, cut short: positive figures (their speed is not asserted)."""
    folder = quantized if name == "quantized" else models("small")
    fplan = forecast.plan_folder(folder, Placement(cpu_mem="1G"))
    assert forecast.disk_read_speed(fplan.sources, samples=6, seconds=0.01) > 0
    assert forecast.disk_read_speed(fplan.sources, samples=6, seconds=0.01, burst=2) > 0
    assert forecast.kernel_read_speed(fplan, seconds=0.01, arena_bytes=2**20) > 0


def test_an_unquantized_folder_with_no_budget_loads_whole(cli, models, measured):
    report = plan_json(cli, models("small"))
    assert report["plan"]["loads_whole"] is True and report["slots"] is None
    assert report["forecast"]["tokens_per_second"] is None and "--cpu-mem" in report["forecast"]["reason"]
    assert measured == []


def test_an_unquantized_folder_under_a_budget_is_planned_as_load_plans_it(cli, models, measured):
    import qwen3next

    folder = models("small")
    cpu_mem = budget_for(folder, 5)
    report = plan_json(cli, folder, "--cpu-mem", cpu_mem, "--max-context", 64)
    with qwen3next.load(folder, cpu_mem=cpu_mem, max_context=64, router_stats=False, quiet=True) as engine:
        built = dataclasses.asdict(engine.plan)
    assert {key: report["plan"][key] for key in built} == built and built["slots"] == 5
    assert report["forecast"]["hit_rate"] == 5 / 128 and len(measured) == 1


@pytest.mark.parametrize("flags", [["--cpu-mem", "12X"], ["--cpu-mem", "-1G"], ["--cpu-mem", "0"],
                                   ["--max-context", "0"], ["--max-context", "100000"], ["--gpu-mem", "1G"]])
def test_bad_flags_are_the_one_line_errors_run_gives(cli, quantized, measured, flags):
    if flags[0] == "--gpu-mem" and torch.cuda.is_available():
        pytest.skip("a GPU budget is valid here")
    code, out, err = cli("inspect", quantized, "--plan", *flags)
    ran = cli("run", "-m", quantized, "-p", "Hello", "-n", "1", "--no-router-stats", "-q", *flags)
    assert (code, out) == (2, "") and err.count("\n") == 1 and err.startswith(f"qwen3next: error: {flags[0]} ")
    assert (code, err) == (ran[0], ran[2])


@pytest.mark.parametrize("flags, message", [
    (["--cpu-mem", "2G"], "--cpu-mem: placement flags go with --plan"),
    (["--recalibrate", "--dtype", "float32"], "--recalibrate, --dtype: placement flags go with --plan"),
    (["--plan", "--router-stats"], "--plan and --router-stats are two different reports"),
])
def test_flags_that_do_not_go_together(cli, quantized, flags, message):
    code, out, err = cli("inspect", quantized, *flags)
    assert (code, out) == (2, "") and message in err and err.count("\n") == 1
