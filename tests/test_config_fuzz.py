"""Property test: any command-line overrides either run or end in one of the clear errors."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import helpers
from adamerge.errors import is_user_error

VALUES = st.one_of(
    st.integers(-3, 5).map(str),
    st.floats(-1, 1, allow_nan=False).map(lambda x: f"{x:.3g}"),
    st.sampled_from(["nan", "inf", "-inf", "null", "abc", "[]", "[1,0]", "[0,1]", "true", "''", "{}"]),
)
KEYS = st.sampled_from([
    "method.lr", "method.init", "method.clamp", "method.steps", "trainer.max_steps", "data.batch_size",
    "data.max_length", "data.calibration_size", "seed", "checkpoint.every_n_steps", "task_vectors.dtype",
    "method.granularity", "task_vectors.include", "resume",
])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["adamerging_layerwise", "adamerging_taskwise", "task_arithmetic"]),
       overrides=st.dictionaries(KEYS, VALUES, min_size=1, max_size=3))
@example(method="adamerging_layerwise", overrides={"task_vectors.dtype": "[]"})  # found in CI: a TypeError
@example(method="adamerging_layerwise", overrides={"method.init": "[]"})  # found in CI: a RuntimeError
@example(method="adamerging_layerwise", overrides={"checkpoint.every_n_steps": "null"})  # found in CI: a TypeError
@example(method="adamerging_layerwise", overrides={"data.max_length": "null", "seed": "null"})  # the same
def test_overrides_run_or_fail_clearly(tiny_pool_cfg, tmp_path_factory, method, overrides):
    from hydra.errors import HydraException

    out = tmp_path_factory.mktemp("fuzz")
    args = [f"method={method}", f"out_dir={out}", "evaluate.enabled=false", "trainer.max_steps=2",
            "data.batch_size=4", "trainer.enable_progress_bar=false"]
    args += [f"{k}={v}" for k, v in overrides.items()]
    try:
        code = helpers.run_inprocess(args, tiny_pool_cfg)
    except HydraException:
        return  # Hydra's own clear message about the override itself (parse/type errors)
    except BaseException as e:  # noqa: BLE001 - the property is exactly "nothing unhandled"
        if is_user_error(e):
            pytest.fail(f"user error escaped cli() instead of a clear message: {e!r}")
        raise
    assert code in (0, 2)
    if code == 0:
        assert (out / "export" / "coefficients.json").exists()
