import pytest

from karst import KarstConfig, LoraConfig
from pipeline.config import ConfigError, TrialConfig, flatten, load_trial_config


def write(tmp_path, text: str):
    path = tmp_path / "trial.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_one_validated_config(tmp_path):
    path = write(tmp_path, "adapter:\n  method: lora\n  rank: 4\nepochs: 3\n")
    config = load_trial_config(path, ["optim.lr=3e-3", "adapter.alpha=2", "task.name=digits"])
    assert config.adapter == LoraConfig(rank=4, alpha=2.0)
    assert (config.optim.lr, config.epochs, config.task.name) == (0.003, 3, "digits")


def test_defaults_are_karst_on_the_builtin_backbone_and_task():
    config = TrialConfig()
    assert isinstance(config.adapter, KarstConfig)
    assert (config.backbone.name, config.task.name) == ("karst_vit_fmnist", "mnist")


def test_flatten_gives_string_params_for_tracking():
    flat = flatten(TrialConfig(adapter=KarstConfig(factor=(4, 2))))
    assert flat["adapter.method"] == "karst"
    assert flat["adapter.factor"] == "[4, 2]"
    assert flat["optim.lr"] == "0.001"


BAD = [
    ("optim:\n  learning_rate: 0.1\n", r"optim.learning_rate: Extra inputs are not permitted"),
    ("epochs: 0\n", r"epochs: Input should be greater than or equal to 1 \(got 0\)"),
    ("adapter:\n  rank: 2\n", r"adapter: Value error, adapter config .* has no 'method'"),
    ("adapter:\n  method: karst\n  rescale: layer\n",
     r"adapter: Value error, rescale='layer' is not valid; choose one of"),
    ("adapter:\n  method: lora\n  factor: 4\n",
     r"method='lora' does not take field\(s\) \['factor'\]"),
    ("adapter:\n  method: karst\n  rank: 2.5\n", r"rank must be an int, got 2.5"),
    ("task:\n  source: s3\n", r"task.source: Input should be 'builtin', 'vtab', 'folder'"),
    ("- just\n- a list\n", r"must hold a mapping, got list"),
    ("epochs: [1\n", r"is not valid YAML"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_configs_name_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_trial_config(write(tmp_path, text))


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'optim.lr' must look like key.sub=value"):
        load_trial_config(write(tmp_path, "{}\n"), ["optim.lr"])
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope.yaml"):
        load_trial_config(tmp_path / "nope.yaml")
