"""``kibble xrcd`` and ``kibble compare`` on the example files (their JSON keys, the plots, bad
input), in a fresh interpreter without the bus, the simulator or the in-process stack; and end
to end, a short offline simulated NIST-4 run's result entering the comparison beside the
seed's participants (``--with``)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from kibble.services.harness import campaign as C
from kibble.services.cli import main as cli

ROOT = Path(__file__).resolve().parents[3]
CCM = ROOT / "examples" / "ccm-m-k8-2019.toml"
SPHERE_B = ROOT / "examples" / "si28kg01b.toml"

NIST4_SHORT = {"rate_hz": 100.0, "velocity": {**C.NIST4_TEST_VELOCITY, "sweeps": 4},
               "force": {**C.NIST4_TEST_FORCE, "weighings": 5, "window_s": 2.0, "settle_s": 2.0},
               "servo": C.NIST4_TEST_SERVO}
"""The shortest NIST-4 run with a type A uncertainty: two velocity sets of 4 sweeps around 5
weighings of 2 s at 100 Hz (189 s simulated, ~6 s of CPU)."""


def test_xrcd_prints_table14_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli.main(["xrcd", str(SPHERE_B), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rho      = 2320.068803(27) kg/m^3" in text and "N_A      = 6.022140539(82)" in text
    assert "m_deficit= 30.6(32) ug" in text and "sphere volume" in text
    d = json.loads(out.read_text())
    for key in ("avogadro_per_mol", "u_avogadro_rel", "core_mass_kg", "density_kg_m3", "realized_mass_kg",
                "u_realized_mass_kg", "u_avogadro_rel_mc"):
        assert math.isfinite(d[key]), key
    assert d["u_avogadro_rel_mc"] == pytest.approx(d["u_avogadro_rel"], rel=0.01)
    assert list(d["investigations"]) == ["PTB"]


def test_compare_prints_tables_writes_json_and_plots(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert cli.main(["compare", str(CCM), "--json", str(out), "--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "KCRV = -0.0192 mg, u = 0.0075 mg" in text and "95 % cut-off 12.6: passed" in text
    d = json.loads(out.read_text())
    for key in ("kcrv_mg", "u_kcrv_mg", "chi2", "chi2_cutoff_95", "birge_ratio", "reference_doe_mg"):
        assert math.isfinite(d[key]), key
    assert list(d["participants"]) == ["BIPM", "KRISS", "NIM", "NIST", "NMIJ", "NRC", "PTB"]
    for p in d["participants"].values():
        assert math.isfinite(p["doe_mg"]) and p["u_doe_mg"] > 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "comparison_doe.png", "comparison_doe_k2.png", "comparison_results.png"]


def test_bad_input_exits_1_naming_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(CCM.read_text().replace('name = "NRC"', 'name = "NIST"'))
    assert cli.main(["compare", str(bad)]) == 1
    err = capsys.readouterr().err
    line = [i for i, t in enumerate(bad.read_text().splitlines(), 1) if t == 'name = "NIST"'][1]
    assert f"{bad}:{line}: participant[5].name: participant 'NIST' appears twice" in err
    assert cli.main(["compare", str(CCM), "--with", str(tmp_path / "none.json")]) == 1
    assert "not a result" in capsys.readouterr().err


def test_fresh_interpreter_without_bus_or_simulator(tmp_path, python_exe, subprocess_env):
    """Both commands' work (:mod:`kibble.services.cli.realization`) imports neither the bus, the
    simulator nor the in-process stack."""
    code = (
        "import json, sys\n"
        "from kibble.services.cli.realization import cli_compare, cli_xrcd\n"
        f"rcs = [cli_xrcd({str(SPHERE_B)!r}, None, 1000),\n"
        f"       cli_compare({str(CCM)!r}, [], {str(tmp_path)!r}, None)]\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('kibble.hil_sim',\n"
        "    'kibble.services.harness.inprocess', 'kibble.services.harness.campaign',\n"
        "    'kibble.services.runtime.client', 'kibble.bus_schema', 'aiomqtt', 'numba')))\n"
        "print(json.dumps({'rcs': rcs, 'loaded': loaded}))\n")
    out = subprocess.run([python_exe, "-c", code], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"rcs": [0, 0], "loaded": []}


def test_an_offline_kibble_run_enters_the_comparison(tmp_path, capsys):
    """A short offline NIST-4 run (real daemons, simulated plant) measures the 1 kg mass with h
    fixed; its result, written as ``kibble measure --offline --json`` writes it, joins the
    seed's participants outside the KCRV: Delta m = mass_kg - mass_true_kg, u its u_mass_kg,
    the KCRV unchanged, its degree of equivalence Delta m - KCRV with u^2 = u^2 + u(KCRV)^2."""
    summary = C.offline_summary("nist4", 3, NIST4_SHORT)
    assert summary["exit_status"] == "success" and math.isfinite(summary["u_mass_kg"])
    result = tmp_path / "nist4.json"
    result.write_text(json.dumps(summary, default=float))
    alone, together = tmp_path / "alone.json", tmp_path / "together.json"
    assert cli.main(["compare", str(CCM), "--json", str(alone)]) == 0
    assert cli.main(["compare", str(CCM), "--with", str(result), "--json", str(together),
                     "--plots", str(tmp_path / "plots")]) == 0
    assert "kibble run (nist4)" in capsys.readouterr().out
    a, b = json.loads(alone.read_text()), json.loads(together.read_text())
    assert b["kcrv_mg"] == pytest.approx(a["kcrv_mg"], rel=1e-12) and b["chi2"] == pytest.approx(a["chi2"], rel=1e-12)
    ours = b["participants"]["kibble run (nist4)"]
    dm = (summary["mass_kg"] - summary["mass_true_kg"]) * 1e6
    assert ours["delta_mg"] == pytest.approx(dm) and ours["u_mg"] == pytest.approx(summary["u_mass_kg"] * 1e6)
    assert ours["in_kcrv"] is False and ours["weight"] == 0.0
    assert ours["doe_mg"] == pytest.approx(dm - b["kcrv_mg"])
    assert ours["u_doe_mg"] == pytest.approx(math.hypot(ours["u_mg"], b["u_kcrv_mg"]))
    # the simulated balance is unbiased within its stated uncertainty
    assert abs(dm) <= 3 * ours["u_mg"]
