import dataclasses

import pytest
import torch

import jitopt
from jitopt.config import PRESETS, Config, patch, resolve


def test_every_field_has_a_docstring():
    source = open(jitopt.config.__file__).read()
    for field in dataclasses.fields(Config):
        after = source.split(f"    {field.name}:", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), f"field {field.name} has no docstring"


def test_unknown_option_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown jitopt option\(s\) \['bogus'\].*on_error"):
        Config.from_options({"bogus": 1})


@pytest.mark.parametrize("options, message", [
    ({"on_error": "ignore"}, r"'on_error' got 'ignore'; valid choices are \['warn', 'raise'\]"),
    ({"verify": "never"}, r"'verify' got 'never'"),
    ({"freeze_weights": "yes"}, r"'freeze_weights' must be True or False"),
    ({"targets": ["gpu-magic"]}, r"unknown name\(s\) \['gpu-magic'\].*'aten'"),
    ({"disabled_passes": ["fold_everything"]}, r"\['fold_everything'\].*fold_conv_bn"),
])
def test_bad_values_are_rejected_with_the_choices(options, message):
    with pytest.raises(ValueError, match=message):
        Config.from_options(options)


def test_bad_option_through_every_api():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unknown jitopt option"):
        jitopt.optimize(bogus=True)
    with pytest.raises(ValueError, match="unknown jitopt option"):
        jitopt.for_inference(model, bogus=True)
    fast = torch.compile(model, backend="jitopt", options={"bogus": True})
    with pytest.raises(Exception, match="unknown jitopt option"):
        fast(torch.randn(1, 2))


def test_modes_map_to_presets():
    assert set(PRESETS) == {"default", "reduce-overhead", "max-autotune"}
    assert resolve(None, "max-autotune").autotune is True
    assert resolve(None, "default") == resolve(None)
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        resolve(None, "fastest")


def test_torch_compile_mode_reaches_the_backend():
    fn = torch.compile(lambda x: x.sin() + 1, backend="jitopt", mode="max-autotune")
    x = torch.randn(3)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), x.sin() + 1)


def test_environment_and_patch(monkeypatch):
    monkeypatch.setenv("JITOPT_ON_ERROR", "warn")
    assert resolve(None).on_error == "warn"
    assert resolve({"on_error": "raise"}).on_error == "raise"
    with patch(verify="each"):
        assert resolve(None).verify == "each"
    assert resolve(None).verify == "end"


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().on_error = "raise"
