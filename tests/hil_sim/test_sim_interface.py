"""Hardware interface of the plants: command validation, NaN safety, reproducibility,
parameters and overrides, events."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kibble.hil_sim.efb import EfbActuators, EfbPlant
from kibble.hil_sim.errors import ActuatorError
from kibble.hil_sim.nist4 import Nist4Actuators, Nist4Plant, Nist4Sensors
from kibble.hil_sim.params import ParamError, load_params, parse_override


@pytest.fixture(scope="module")
def n4():
    return Nist4Plant(seed=0)


@pytest.fixture(scope="module")
def efb():
    return EfbPlant(seed=0)


BAD_NIST4 = [
    ("main_coarse", dict(main_coarse=float("nan"))),
    ("main_coarse", dict(main_coarse=float("inf"))),
    ("main_coarse", dict(main_coarse=40000)),
    ("main_fine", dict(main_fine=-40000)),
    ("main_fine", dict(main_fine=1.5)),
    ("cm_coarse", dict(cm_coarse="12")),
    ("cm_fine", dict(cm_fine=True)),
    ("damping[2]", dict(damping=(0, 0, 70000, 0, 0, 0))),
    ("damping[5]", dict(damping=(0, 0, 0, 0, 0, float("nan")))),
    ("damping", dict(damping=(0, 0, 0))),
    ("damping", dict(damping=None)),
    ("hv[0]", dict(hv=(-32769, 0, 0, 0, 0, 0))),
    ("main_force_mode", dict(main_force_mode=1)),
    ("hv_enable", dict(hv_enable="yes")),
]


@pytest.mark.parametrize("channel,kw", BAD_NIST4)
def test_nist4_rejects_bad_commands(n4, channel, kw):
    x0, env0 = n4.x.copy(), n4.env.copy()
    with pytest.raises(ActuatorError) as ei:
        n4.step_frame(Nist4Actuators(**kw))
    assert isinstance(ei.value, ValueError)
    assert ei.value.channel == channel
    assert channel in str(ei.value)
    assert np.array_equal(n4.x, x0) and np.array_equal(n4.env, env0)  # nothing integrated


@pytest.mark.parametrize("kw", [dict(hv_code=float("nan")), dict(hv_code=2 ** 23), dict(hv_code=0.5),
                                dict(hv_to_main=0), dict(hv_enable=None)])
def test_efb_rejects_bad_commands(efb, kw):
    x0 = efb.x.copy()
    with pytest.raises(ActuatorError):
        efb.step_frame(EfbActuators(**kw))
    assert np.array_equal(efb.x, x0)


def test_events_reject_non_finite(n4, efb):
    for bad in (lambda: n4.inject_force("z", float("nan"), 1.0), lambda: n4.inject_force("w", 1.0, 1.0),
                lambda: n4.set_temperature(float("inf")), lambda: n4.set_pressure(-1.0),
                lambda: efb.place_mass(float("nan")), lambda: efb.inject_force(1.0, float("nan"))):
        with pytest.raises(ValueError):
            bad()


codes16 = st.one_of(st.integers(-40000, 40000), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.text(max_size=2))


@settings(max_examples=60, deadline=None)
@given(mc=codes16, mf=codes16, damp=st.lists(codes16, min_size=0, max_size=7),
       hv=st.lists(codes16, min_size=6, max_size=6), fm=st.one_of(st.booleans(), st.integers(0, 1)))
def test_nist4_never_integrates_garbage(mc, mf, damp, hv, fm):
    p = Nist4Plant(seed=1)
    a = Nist4Actuators(main_coarse=mc, main_fine=mf, damping=tuple(damp), hv=tuple(hv), main_force_mode=fm)
    try:
        s = p.step_frame(a)
    except ActuatorError:
        assert p.truth().t == 0.0
        return
    assert np.all(np.isfinite(p.x))
    assert np.all(np.isfinite(s.psd_V)) and math.isfinite(s.dvm_V)


def test_same_seed_bit_identical_and_block_equals_frames():
    def drive(p, k):
        return Nist4Actuators(main_coarse=(k * 37) % 2000 - 1000, main_fine=(k * 911) % 60000 - 30000,
                              main_force_mode=k > 50, damping=(k % 7, -k % 5, 3, 0, -2, k % 3),
                              damping_enable=True)
    a, b = Nist4Plant(seed=42), Nist4Plant(seed=42)
    fa = [a.step_frame(drive(a, k)) for k in range(300)]
    fb = [b.step_frame(drive(b, k)) for k in range(300)]
    for x, y in zip(fa, fb):
        for name in Nist4Sensors.__dataclass_fields__:
            assert np.array_equal(np.asarray(getattr(x, name)), np.asarray(getattr(y, name)))
    c = Nist4Plant(seed=43)
    fc = [c.step_frame(drive(c, k)) for k in range(300)]
    assert any(not np.array_equal(x.ifo_phase_rad, y.ifo_phase_rad) for x, y in zip(fa, fc))
    # block run == frame-by-frame with the same command
    d, e = Nist4Plant(seed=7), Nist4Plant(seed=7)
    act = Nist4Actuators(main_coarse=300, main_force_mode=True)
    blk = d.run(act, 200).sensors
    rows = np.array([np.concatenate([s.ifo_fringes, s.ifo_phase_rad, s.psd_V,
                                     [s.dvm_V, s.main_monitor_V, s.cm_monitor_V, s.magnet_temperature_C,
                                      s.pressure_Pa, s.time_s]]) for s in (e.step_frame(act) for _ in range(200))])
    assert np.array_equal(blk, rows)
    # EFB
    f1, f2 = EfbPlant(seed=5), EfbPlant(seed=5)
    acts = [EfbActuators(hv_code=100_000 + 17 * k, hv_enable=True) for k in range(300)]
    r1 = [f1.step_frame(x) for x in acts]
    r2 = [f2.step_frame(x) for x in acts]
    assert r1 == r2


def test_params_sources_overrides_and_errors():
    for model in ("nist4", "efb"):
        p = load_params(model)
        for n in p.names():
            assert p.spec(n).source.strip(), n
    p = load_params("nist4", {"wheel.q": 500, "coil.profile_coeffs": [0, 0, 0, 0, 0, 0]})
    assert p["wheel.q"] == 500.0 and isinstance(p["wheel.q"], float)
    p = load_params("nist4", ["wheel.q=300", "noise.ground=false"])
    assert p["wheel.q"] == 300.0 and p["noise.ground"] is False
    assert parse_override("a.b = [1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ParamError, match="unknown parameter 'wheel.qq'"):
        load_params("nist4", {"wheel.qq": 1.0})
    with pytest.raises(ParamError, match="above maximum"):
        load_params("nist4", {"wheel.radius_m": 5.0})
    with pytest.raises(ParamError, match="finite"):
        load_params("efb", {"linkage.q": float("nan")})
    with pytest.raises(ParamError, match="bool"):
        load_params("efb", {"noise.ground": 1})
    with pytest.raises(ParamError, match="list of 6"):
        load_params("nist4", {"coil.profile_coeffs": [0.0]})
    with pytest.raises(ParamError, match="integer"):
        load_params("nist4", {"damping_coils.dac_bits": 15.5})
    with pytest.raises(ParamError):
        Nist4Plant({"nope": 1})


def test_mass_events_ramp_and_aux_lift(n4):
    p = Nist4Plant({"noise.ground": False}, seed=3)
    p.lift_aux(on_pan=False)
    p.place_mass(True)
    p.run(Nist4Actuators(), 500, record_truth=False)
    tr = p.truth()
    # 0.5 s into the 2 s ramps (main_side.lift_ramp_s), each event ramping its own mass over
    # it: a quarter of the 1 kg test mass on, a quarter of the 0.5 kg aux mass off
    assert tr.m_test == pytest.approx(0.25) and tr.m_aux == pytest.approx(0.375)
    p.run(Nist4Actuators(), 2000, record_truth=False)
    assert p.truth().m_test == 1.0 and p.truth().m_aux == 0.0


def test_hv_interlocked_by_pressure():
    p = Nist4Plant(seed=4)
    act = Nist4Actuators(hv=(20000, 0, 20000, 0, 20000, 0), hv_enable=True)
    p.act = p.decode(act)
    on = p.derivative()[13]
    p.set_pressure(1.0)
    off = p.derivative()[13]
    assert abs(on) > 0 and off == 0.0


_PROFILED = """
[noise]
ground = { value = true, source = "s" }
flicker = { value = true, source = "s" }
[interferometer]
noise_asd_m = { value = 2e-11, unit = "m/sqrt(Hz)", min = 0.0, max = 1e-6, source = "base" }
drift_m_s = { value = 0.0, unit = "m/s", min = 0.0, max = 1e-6, source = "base" }
[profiles.published]
"interferometer.noise_asd_m" = { value = 6e-11, source = "seed: why" }
[profiles.off]
"interferometer.drift_m_s" = { value = 0.0, source = "no drift" }
"""


def test_noise_profiles_take_the_profile_table_and_overrides_win(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text(_PROFILED)
    quiet = load_params("m", path=f, noise="quiet")
    assert quiet.noise == "quiet" and quiet["interferometer.noise_asd_m"] == 2e-11
    pub = load_params("m", path=f, noise="published")
    assert pub.noise == "published" and pub["interferometer.noise_asd_m"] == 6e-11
    assert pub.spec("interferometer.noise_asd_m").source.startswith("seed: why [profile published; quiet: 2e-11")
    assert pub["noise.ground"] is True
    off = load_params("m", path=f, noise="off")
    assert off.noise == "off" and off["noise.ground"] is False and off["noise.flicker"] is False
    assert off["interferometer.noise_asd_m"] == 2e-11
    mine = load_params("m", {"interferometer.noise_asd_m": 1e-12, "noise.ground": True}, path=f, noise="off")
    assert mine["interferometer.noise_asd_m"] == 1e-12 and mine["noise.ground"] is True and mine.noise == "off"
    assert load_params("m", path=f).noise == "published"


@pytest.mark.parametrize("table, match", [
    ('[profiles.published]\n"interferometer.nope" = { value = 1.0, source = "s" }', "names no parameter"),
    ('[profiles.published]\n"interferometer.noise_asd_m" = { value = 1.0 }', "must be"),
    ('[profiles.published]\n"interferometer.noise_asd_m" = { value = 5.0, source = "s" }', "above maximum"),
    ('[profiles.quiet]\n"interferometer.noise_asd_m" = { value = 1e-11, source = "s" }', "base values"),
])
def test_a_bad_profile_table_is_refused_with_its_name(tmp_path, table, match):
    f = tmp_path / "m.toml"
    f.write_text(_PROFILED.split("[profiles.published]")[0] + table)
    with pytest.raises(ParamError, match=match):
        load_params("m", path=f, noise="published")


def test_an_unknown_noise_profile_is_refused():
    with pytest.raises(ParamError, match="unknown noise profile 'loud'; one of published, quiet, off"):
        load_params("nist4", noise="loud")
    assert Nist4Plant(noise="quiet").params.noise == "quiet"
    assert load_params("efb", noise="off")["noise.ground"] is False
