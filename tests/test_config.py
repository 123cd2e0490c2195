import pytest

from karst import KarstConfig, LoraConfig, RescaleConfig, config_from_dict, lokr_config, make_config

BAD_FIELDS = [
    (dict(num_kernels=0), ValueError, r"num_kernels=0 .* >= 1"),
    (dict(rank=0), ValueError, r"rank=0 .* >= 1"),
    (dict(rank=2.5), TypeError, r"rank must be an int"),
    (dict(factor=(4, 0)), ValueError, r"factor\[1\] \(f_in\)=0"),
    (dict(factor="8"), TypeError, r"factor must be an int or a pair"),
    (dict(alpha=-1.0), ValueError, r"alpha=-1.0 .* > 0"),
    (dict(rescale="layer"), ValueError, r"rescale='layer' .* \['channel', 'scalar', 'none'\]"),
    (dict(init="xavier"), ValueError, r"init='xavier' .* \['gaussian', 'kaiming'\]"),
    (dict(forward="sparse"), ValueError, r"forward='sparse'"),
    (dict(targets=()), ValueError, r"targets=\(\) is not valid"),
]


@pytest.mark.parametrize(("fields", "error", "message"), BAD_FIELDS)
def test_bad_fields_are_named(fields, error, message):
    with pytest.raises(error, match=message):
        KarstConfig(**fields)


def test_int_factor_becomes_a_pair_and_scale_is_alpha_over_rank():
    config = KarstConfig(factor=4, rank=2, alpha=3.0)
    assert config.factor == (4, 4)
    assert config.scale == 1.5


def test_lokr_is_one_kernel_without_rescaling():
    config = lokr_config(factor=8, rank=2)
    assert (config.num_kernels, config.rescale) == (1, "none")


@pytest.mark.parametrize(
    "config",
    [KarstConfig(num_kernels=3, factor=(2, 4), targets="*fc1"), LoraConfig(rank=2),
     RescaleConfig(rescale="scalar"), make_config("linear"), make_config("full")],
)
def test_dict_round_trip(config):
    assert config_from_dict(config.to_dict()) == config


def test_make_config_names_unknown_fields():
    with pytest.raises(ValueError, match=r"method='lora' does not take field\(s\) \['factor'\]"):
        make_config("lora", factor=4)
    with pytest.raises(ValueError, match=r"method='dora' is not valid; choose one of"):
        make_config("dora")


def test_ssf_refuses_no_rescaling():
    with pytest.raises(ValueError, match=r"rescale='none' .* \['channel', 'scalar'\]"):
        RescaleConfig(rescale="none")
