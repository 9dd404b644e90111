"""One YAML config, validated into typed dataclasses before any work starts.

Its parts: schema.py (the keys, types and defaults), loading.py (files, `extends`, overrides),
coerce.py (YAML values into the typed dataclasses, with messages naming the key and its file),
checks.py (checks across keys), views.py (the config as plain data).

Files may name a parent with ``extends: base.yaml`` (resolved relative to the file);
command lines add ``section.key=value`` overrides whose values are parsed as YAML.
Every key remembers where it came from so an error can name the file to fix.
"""
from disent.config.checks import micro_batch_size, validate
from disent.config.loading import OVERRIDE_ORIGIN, deep_merge, from_dict, load_config, parse_override
from disent.config.schema import (Config, ConfigError, DataConfig, DeepSpeedPassThrough, EvalConfig, ModelConfig,
                                  OptimConfig, OptimizerConfig, TrackingConfig, TrainConfig)
from disent.config.views import changed_keys, flatten, get_dotted, to_dict, to_yaml

__all__ = ["OVERRIDE_ORIGIN", "Config", "ConfigError", "DataConfig", "DeepSpeedPassThrough", "EvalConfig", "ModelConfig",
           "OptimConfig", "OptimizerConfig", "TrackingConfig", "TrainConfig", "changed_keys", "deep_merge", "flatten",
           "from_dict", "get_dotted", "load_config", "micro_batch_size", "parse_override", "to_dict", "to_yaml",
           "validate"]
