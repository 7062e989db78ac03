"""The analysis pipeline (kibble.services.analysis.analyze_run): run documents in, a result out,
on synthetic documents with a known answer. The documents by stream; the EFB's bracketing of
the weighings by gradient determinations and the propagation of their uncertainty (against
finite differences of the whole analysis); a NIST-4 run built from an analytic Bl(z) and
eq. 16 gives h_SI within its uncertainty; refusals with the reason; and ``kibble analyze`` of
recordings of both instruments, in a fresh interpreter, writes both instruments' plots without
loading the simulator or the in-process stack."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest

from kibble.bus_schema import units
from kibble.bus_schema.codec import encode
from kibble.bus_schema.messages import ParamList, ParamSpec
from kibble.services import analysis as an
from kibble.services.data.recordfile import RunWriter, encode_document, run_document_topic
from kibble.services.data.runanalysis import RecordedRun, analyze, cli_analyze, load_run


def _event(info: dict, t: np.ndarray, **data) -> dict:
    return {"info": info, "data": {"sim_time_s": t.tolist(), **{k: np.asarray(v).tolist() for k, v in data.items()}}}


def _documents(plan: str, streams: dict[str, list[dict]], exit_status: str = "success") -> list[tuple[str, dict]]:
    """start, a descriptor per stream, the events (in time order), stop."""
    docs = [("start", {"plan_name": plan})]
    docs += [("descriptor", {"uid": name, "name": name}) for name in streams]
    events = sorted(((e["data"]["sim_time_s"][0], name, e) for name, ev in streams.items() for e in ev),
                    key=lambda x: x[0])
    docs += [("event", dict(e, descriptor=name)) for _, name, e in events]
    return docs + [("stop", {"exit_status": exit_status, "reason": "" if exit_status == "success" else "a test"})]


def _write_run(path, docs, servo: dict[str, float]) -> None:
    """A run file as the recorder writes it: the servo's parameters, then the documents."""
    specs = [ParamSpec(name=k, type="float", value=v, default=v) for k, v in servo.items()]
    with RunWriter(path, {"run_id": path.stem, "instrument": "test"}) as w:
        w.append("kb/test/servo/params", encode(ParamList(service="servo", params=specs)))
        for name, doc in docs:
            w.append(run_document_topic("test"), encode_document(name, doc))


# ============================================================================ EFB


def _gradient_events(t0: float, dcdz: float, rng, noise_f: float = 2e-18) -> list[dict]:
    """One determination as efb_gradient records it: 2 sweeps of 11 points within 2 mm, 3 s
    windows at 100 Hz, the held bridge reading updated every second."""
    z_pts = np.linspace(-1e-3, 1e-3, 11)
    events, t = [], t0
    for s in range(2):
        for i, z in enumerate(z_pts if s == 0 else z_pts[::-1]):
            tt = t + np.arange(300) * 0.01
            readings = 28.4e-12 + dcdz * z + 1e-7 * z**2 + noise_f * rng.standard_normal(4)
            c = readings[np.minimum((tt - t + 0.5).astype(int), 3)]
            events.append(_event({"sweep": s, "index": i, "z_set_m": z, "z_weigh_m": 0.0}, tt,
                                 coil_z_m=np.full(tt.size, z), capacitance_f=c))
            t += 10.0
    return events


def _weighing_events(t0: float, kappa: float, mass: float, g: float, drift_n_per_s: float) -> list[dict]:
    """One efb_weighing run: +U +L +U -U -L -U, voltages from F = kappa (V - V_s)^2 with a
    restoring force that drifts linearly."""
    events = []
    for j, (pol, idx, loaded) in enumerate([("+", 0, 0), ("+", 1, 1), ("+", 2, 0),
                                            ("-", 0, 0), ("-", 1, 1), ("-", 2, 0)]):
        t = t0 + 10.0 * j + np.arange(100) * 0.05
        f = 4.735e-6 + drift_n_per_s * t + loaded * mass * g
        v = 0.04 + (1 if pol == "+" else -1) * np.sqrt(f / kappa)
        events.append(_event({"polarity": pol, "index": idx, "loaded": bool(loaded)}, t, coil_voltage_v=v))
    return events


def test_run_documents_give_the_events_of_a_stream_in_order():
    events = {"weighing": _weighing_events(0.0, 4.7e-10, 1e-6, 9.8, 0.0),
              "gradient": _gradient_events(100.0, 0.947e-9, np.random.default_rng(0))}
    docs = an.RunDocuments(_documents("efb_weighing", events))
    weighing = docs.events("weighing")
    assert [e["info"]["polarity"] + str(e["info"]["index"]) for e in weighing] == ["+0", "+1", "+2", "-0", "-1", "-2"]
    assert len(docs.events("gradient")) == 22 and docs.events("sweep") == []
    assert docs.stream(weighing[0]) == "weighing" and docs.stream({"descriptor": "unknown"}) is None
    assert docs.plans == ["efb_weighing"] and docs.stops[0]["exit_status"] == "success"


def test_each_trial_takes_the_determinations_bracketing_it_and_their_uncertainty():
    """G0 run0 G1 run1 G2 run2 G3: trial 0 (run 0) is bracketed by G0 and G1, trial 1 by G1 and
    G2 (G3 brackets no trial: run 2 only lends its first unloaded reading). The mass is linear
    in kappa (eq. 1), so with voltages made with kappa_true it is m kappa_used / kappa_true; the
    dC/dz part of the type A uncertainty is checked against finite differences of the whole
    analysis (each determination's capacitances tilted by a known dC/dz)."""
    rng = np.random.default_rng(3)
    kappa_true, mass, g = 4.735e-10, 1e-6, 9.80101
    dcdz_in = [0.9470e-9, 0.9471e-9, 0.9469e-9, 0.9472e-9]
    grads, weighs = [], []
    for j, d in enumerate(dcdz_in):
        grads.append(_gradient_events(1000.0 * j, d, rng))
        if j < 3:
            weighs.append(_weighing_events(1000.0 * j + 500.0, kappa_true, mass, g, 1e-12))

    def run(gr):
        return an.analyze_efb([e for w in weighs for e in w], g_m_per_s2=g,
                              gradients=[e for d in gr for e in d])

    res = run(grads)
    d = np.array(res.dcdz_f_per_m)
    assert res.n_gradients == 4 and res.n_trials == 2
    assert d == pytest.approx(dcdz_in, rel=2e-5)
    assert res.kappa_trial_f_per_m == pytest.approx([(d[0] + d[1]) / 4, (d[1] + d[2]) / 4], rel=1e-15)
    kt = np.array(res.kappa_trial_f_per_m)
    assert res.mass_trial_kg == pytest.approx(mass * kt / kappa_true, rel=1e-9)
    # d mass / d dC/dz_j by finite differences: tilt determination j's capacitances by delta z
    delta = 1e-15
    sens = []
    for j in range(4):
        tilted = [list(det) for det in grads]
        tilted[j] = [dict(e, data=dict(e["data"], capacitance_f=(np.array(e["data"]["capacitance_f"])
                                                                 + delta * np.array(e["data"]["coil_z_m"])).tolist()))
                     for e in grads[j]]
        sens.append((run(tilted).mass_kg - res.mass_kg) / delta)
    assert sens[3] == 0.0 and sens[1] == pytest.approx(sens[0] + sens[2], rel=1e-4)
    u_expected = math.sqrt(sum((s * u) ** 2 for s, u in zip(sens, res.u_dcdz_f_per_m)))
    assert res.u_a_dcdz_kg == pytest.approx(u_expected, rel=1e-4)
    assert res.u_a_kg == pytest.approx(math.hypot(res.u_a_weighing_kg, u_expected), rel=1e-4)


def test_weighings_outside_the_gradient_determinations_are_refused():
    rng = np.random.default_rng(1)
    grads = _gradient_events(1000.0, 0.947e-9, rng)
    weighs = _weighing_events(0.0, 4.735e-10, 1e-6, 9.8, 0.0) + _weighing_events(2000.0, 4.735e-10, 1e-6, 9.8, 0.0)
    with pytest.raises(ValueError, match="trial 0 .* is not bracketed by gradient determinations"):
        an.analyze_efb(weighs, g_m_per_s2=9.8, gradients=grads)
    with pytest.raises(ValueError, match="not both or neither"):
        an.analyze_efb(weighs, g_m_per_s2=9.8, gradients=grads, kappa_f_per_m=4.7e-10)


def test_a_recorded_efb_run_is_analysed_with_its_measured_gradient(tmp_path):
    rng = np.random.default_rng(5)
    grads = [_gradient_events(1000.0 * j, 0.947e-9, rng) for j in range(4)]
    weighs = [_weighing_events(1000.0 * j + 500.0, 4.735e-10, 1e-6, 9.80101, 0.0) for j in range(3)]
    docs = _documents("efb_run", {"gradient": [e for g in grads for e in g],
                                  "weighing": [e for w in weighs for e in w]})
    run = RecordedRun(tmp_path / "run.kbr", docs, {"servo": {"g_m_per_s2": 9.80101, "kappa_f_per_m": 1.0}})
    result = analyze(run)
    direct = an.analyze_efb([e for w in weighs for e in w], g_m_per_s2=9.80101,
                            gradients=[e for g in grads for e in g])
    assert run.plans == ["efb_run"] and result.n_gradients == 4
    assert result.mass_kg == direct.mass_kg == pytest.approx(1e-6, rel=1e-5)


# ============================================================================ NIST-4

BL0_T_M = 700.0
Z_HALF_M = 5e-3
CURVATURE = 2e-3
"""Bl(z) = BL0 (1 + CURVATURE (z / Z_HALF)^2) over the sweeps."""


def _flux_t_m2(z_m):
    """Phi(z) = int_0^z Bl dz, T m^2."""
    return BL0_T_M * (z_m + CURVATURE * z_m**3 / (3.0 * Z_HALF_M**2))


def _current_a(force_n: float) -> float:
    """Solve Bl(I) I = F with Bl(I) = Bl0 (1 + alpha I + beta I^2) (seed 001 eq. 16) by Newton."""
    a, b = an.ALPHA_NIST4_PER_A, an.BETA_NIST4_PER_A2
    i = force_n / BL0_T_M
    for _ in range(50):
        i -= (BL0_T_M * (i + a * i**2 + b * i**3) - force_n) / (BL0_T_M * (1 + 2 * a * i + 3 * b * i**2))
    return i


def _nist4_run_documents(rng, mass_kg: float, g_m_per_s2: float, noise_v: float = 1e-8) -> list[tuple[str, dict]]:
    """A nist4_run as the plan records it: a velocity set (6 sweeps over 10 mm at 1 mm/s, 50 Hz,
    the DVM integrating over each frame), a force set (5 weighings, mass on first: the voltage
    across the 100 ohm resistor with Bl(I) I = +-m g / 2), a velocity set; the magnet at 300 K."""
    sweeps, weighings = [], []

    def velocity_set(t0: float) -> float:
        for k in range(6):
            t = t0 + np.arange(501) / 50.0
            travel = 1e-3 * (t - t0)
            z = Z_HALF_M - travel if k % 2 == 0 else -Z_HALF_M + travel
            u = np.concatenate([[0.0], np.diff(_flux_t_m2(z)) / np.diff(t)])
            u += noise_v * rng.standard_normal(t.size)
            sweeps.append(_event({"index": k, "direction": "down" if k % 2 == 0 else "up"}, t,
                                 coil_z_m=z, coil_voltage_v=u, temperature_k=np.full(t.size, 300.0)))
            t0 = t[-1] + 2.0
        return t0

    t0 = velocity_set(0.0)
    for k in range(5):
        t = t0 + np.arange(100) / 50.0
        on = k % 2 == 0
        v = 100.0 * _current_a((0.5 if on else -0.5) * mass_kg * g_m_per_s2) + noise_v * rng.standard_normal(t.size)
        weighings.append(_event({"index": k, "mass_on": on}, t, coil_voltage_v=v,
                                temperature_k=np.full(t.size, 300.0)))
        t0 = t[-1] + 10.0
    velocity_set(t0)
    return _documents("nist4_run", {"sweep": sweeps, "weighing": weighings})


def test_a_nist4_run_built_from_an_analytic_bl_gives_h_si_within_its_uncertainty(tmp_path, capsys):
    """Bl_V at the weighing position and Bl_F both 700 T m (the current dependence exactly eq.
    16 with the analysis's alpha and beta): the run realizes h_SI, within the stated u; the
    mass the balance measures is the true one; kibble analyze writes NIST-4's plots."""
    mass, g = 1.0, 9.801031394
    path = tmp_path / "nist4.kbrun"
    _write_run(path, _nist4_run_documents(np.random.default_rng(7), mass, g), {"g_m_per_s2": g, "test_mass_kg": mass})
    result = analyze(load_run(path))
    assert result.n_sweeps == 12 and result.n_weighings == 5 and result.n_triplets == 1
    assert result.n_bl_v == 6 and result.n_bl_f == 3
    assert result.bl_v_t_m == pytest.approx(BL0_T_M, rel=1e-7)
    assert 0 < result.u_h_rel < 1e-7
    assert abs(result.h_j_s - an.H_J_S) <= 3 * result.u_h_j_s, result.summary()
    assert abs(result.mass_kg - mass) <= 3 * result.u_mass_kg
    assert result.mass_kg / mass - 1 == pytest.approx(-result.h_rel_err, rel=1e-6)
    assert cli_analyze(str(path), str(tmp_path / "r.json"), str(tmp_path / "plots"), "table3") == 0
    out = capsys.readouterr().out
    assert "total relative uncertainty" in out
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["plan"] == "nist4_run" and summary["u_b_h_j_s"] > 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "nist4_bl_profile.png", "nist4_bl_time_0.png", "nist4_h.png"]


# ============================================================================ refusals, kibble analyze


def test_a_run_that_cannot_be_analysed_is_refused_with_the_reason():
    weighs = [e for j in range(3) for e in _weighing_events(100.0 * j, 4.735e-10, 1e-6, 9.8, 0.0)]
    servo = {"g_m_per_s2": 9.8, "kappa_f_per_m": 4.735e-10}
    with pytest.raises(ValueError, match="no run documents"):
        an.analyze_run(an.RunDocuments(), servo)
    with pytest.raises(ValueError, match="the plan ended fail: a test"):
        an.analyze_run(an.RunDocuments(_documents("efb_weighing", {"weighing": weighs}, "fail")), servo)
    with pytest.raises(ValueError, match="no analysis for plan 'velocity_set'"):
        an.analyze_run(an.RunDocuments(_documents("velocity_set", {"sweep": []})), servo)
    docs = an.RunDocuments(_documents("efb_weighing", {"weighing": weighs}))
    with pytest.raises(ValueError, match="servo's kappa_f_per_m, which is not known"):
        an.analyze_run(docs, {"g_m_per_s2": 9.8})
    with pytest.raises(ValueError, match="budget table3 is the nist4 budget, not one for the efb"):
        an.analyze_run(docs, servo, budget="table3")
    with pytest.raises(ValueError, match="unknown budget 'table2'"):
        an.analyze_run(docs, servo, budget="table2")
    assert an.analyze_run(docs, servo, budget="table1").u_b_kg > 0
    assert an.analyze_run(docs, servo).mass_kg == pytest.approx(1e-6, rel=1e-9)


def test_kibble_analyze_writes_both_instruments_plots_without_the_simulator_or_the_stack(
        tmp_path, python_exe, subprocess_env):
    """kibble analyze of an EFB and a NIST-4 recording in a fresh interpreter: each gets its
    plots, and neither the simulator (kibble.hil_sim) nor the in-process stack (nor the offline
    campaign that drives it) is imported."""
    efb = tmp_path / "efb.kbrun"
    weighs = [e for j in range(3) for e in _weighing_events(100.0 * j, 4.735e-10, 1e-6, 9.80101, 0.0)]
    _write_run(efb, _documents("efb_weighing", {"weighing": weighs}),
               {"g_m_per_s2": 9.80101, "kappa_f_per_m": 4.735e-10})
    nist4 = tmp_path / "nist4.kbrun"
    _write_run(nist4, _nist4_run_documents(np.random.default_rng(8), 1.0, 9.8),
               {"g_m_per_s2": 9.8, "test_mass_kg": 1.0})
    code = (
        "import json, sys\n"
        "from kibble.services.cli import main as cli\n"
        f"rcs = [cli.main(['analyze', {str(efb)!r}, '--plots', {str(tmp_path / 'efb')!r}]),\n"
        f"       cli.main(['analyze', {str(nist4)!r}, '--plots', {str(tmp_path / 'nist4')!r}])]\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(\n"
        "    ('kibble.hil_sim', 'kibble.services.harness.inprocess', 'kibble.services.harness.campaign')))\n"
        "print(json.dumps({'rcs': rcs, 'loaded': loaded}))\n")
    out = subprocess.run([python_exe, "-c", code], env=subprocess_env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"rcs": [0, 0], "loaded": []}, out.stdout
    assert [p.name for p in (tmp_path / "efb").iterdir()] == ["efb_mass.png"]
    assert sorted(p.name for p in (tmp_path / "nist4").iterdir()) == [
        "nist4_bl_profile.png", "nist4_bl_time_0.png", "nist4_h.png"]


def test_a_run_recorded_before_a_rename_reads_under_the_new_names(tmp_path, monkeypatch):
    """A run file recorded before names were renamed to say their unit divides: the servo's
    parameters and the events' data are read under the new names, and the run analyses as the
    same run recorded after."""
    monkeypatch.setattr(units, "RENAMED", {"g_before": "g_m_per_s2", "voltage_before": "coil_voltage_v"})
    weighs = [e for j in range(3) for e in _weighing_events(100.0 * j, 4.735e-10, 1e-6, 9.80101, 0.0)]
    old = [dict(e, data={("voltage_before" if k == "coil_voltage_v" else k): v for k, v in e["data"].items()})
           for e in weighs]
    _write_run(tmp_path / "old.kbrun", _documents("efb_weighing", {"weighing": old}),
               {"g_before": 9.80101, "kappa_f_per_m": 4.735e-10})
    _write_run(tmp_path / "new.kbrun", _documents("efb_weighing", {"weighing": weighs}),
               {"g_m_per_s2": 9.80101, "kappa_f_per_m": 4.735e-10})
    before, after = load_run(tmp_path / "old.kbrun"), load_run(tmp_path / "new.kbrun")
    assert before.params == after.params == {"servo": {"g_m_per_s2": 9.80101, "kappa_f_per_m": 4.735e-10}}
    assert before.events("weighing") == after.events("weighing")
    assert analyze(before).summary() == analyze(after).summary()
