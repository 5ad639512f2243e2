import pytest

from mgsr_megatron.config import Config, load_config, parse_overrides
from mgsr_megatron.errors import UserError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student:\n  num_layers: 6\n  hidden_size: 96\nmgsr:\n  rho: 0.7\n")
    cfg = load_config(path, ["--student.hidden_size=128", "--mgsr.w_span", "0.5",
                             "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size=2",
                             "--teacher.num_query_groups=null"])
    assert cfg.student.num_layers == 6 and cfg.student.hidden_size == 128
    assert cfg.mgsr.rho == 0.7 and cfg.mgsr.w_span == 0.5
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.pipeline_model_parallel_size == 2
    assert cfg.teacher.num_query_groups is None


def test_int_accepted_for_float():
    cfg = load_config(None, ["--optimizer.lr=1"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)


@pytest.mark.parametrize("text,message", [
    ("studnt:\n  num_layers: 2\n", "unknown config section 'studnt'"),
    ("student:\n  num_layer: 2\n", "unknown config key 'student.num_layer'"),
    ("student:\n  num_layers: two\n", "student.num_layers': expected int, got 'two'"),
    ("student:\n  tie_embeddings: 3\n", "student.tie_embeddings': expected true/false"),
    ("student: [1, 2]\n", "section 'student' must be a mapping"),
    ("student:\n  num_layers: [\n", "invalid YAML"),
])
def test_bad_yaml_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[")) as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_bad_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("student:\n  num_layers: 2\n  hidden_size: [\n")
    with pytest.raises(UserError, match=rf"{path}:\d+: invalid YAML"):
        load_config(path)


@pytest.mark.parametrize("argv,message", [
    (["--student.nope=1"], "unknown config key 'student.nope'"),
    (["--schedule.train_iters=1.5"], "schedule.train_iters': expected int"),
    (["--student.num_layers"], "flag '--student.num_layers' needs a value"),
    (["--bogus-flag=1"], "unknown flag '--bogus-flag'"),
    (["positional"], "unexpected argument 'positional'"),
])
def test_bad_overrides(argv, message):
    with pytest.raises(UserError, match=message):
        load_config(None, argv)


def test_missing_file():
    with pytest.raises(UserError, match="config file not found: /no/such.yaml"):
        load_config("/no/such.yaml")


def test_parse_overrides_types():
    assert parse_overrides(["--a.b=true", "--a.c=3", "--a.d=x y"]) == {"a": {"b": True, "c": 3, "d": "x y"}}


def test_every_section_roundtrips():
    assert set(Config().to_dict()) == {"teacher", "student", "parallel", "data", "mgsr", "optimizer",
                                       "schedule", "checkpoint", "logging", "deepspeed"}


@pytest.mark.parametrize("overrides,needed", [
    ([], True),  # the MGSR default: DAC-KL, span and on-policy rows
    (["--mgsr.w_dac=0", "--mgsr.w_span=0", "--mgsr.data_schedule=ground_truth"], False),  # SFT only
    (["--mgsr.w_dac=0", "--mgsr.w_span=0", "--mgsr.data_schedule=seqkd"], True),  # generated rows
    (["--mgsr.w_span=0", "--mgsr.data_schedule=ground_truth"], True),  # DAC-KL on ground truth
    (["--mgsr.w_dac=0", "--mgsr.data_schedule=ground_truth"], True),  # span loss alone
])
def test_needs_teacher(overrides, needed):
    assert load_config(None, overrides).needs_teacher is needed


def test_off_policy_that_can_never_generate_is_refused():
    from mgsr_megatron.training.run import check_generation_fits

    cfg = Config()
    cfg.mgsr.data_schedule, cfg.schedule.eval_interval = "off_policy", 0
    with pytest.raises(UserError, match="never generates"):
        check_generation_fits(cfg)
    for fix in ("init_threshold", "eval_interval", "schedule"):
        ok = Config()
        ok.mgsr.data_schedule, ok.schedule.eval_interval = "off_policy", 0
        if fix == "init_threshold":
            ok.mgsr.init_threshold = 0.2
        elif fix == "eval_interval":
            ok.schedule.eval_interval = 50
        else:
            ok.mgsr.data_schedule = "on_policy"
        check_generation_fits(ok)
