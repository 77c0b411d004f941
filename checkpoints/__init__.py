"""Hugging Face checkpoints -> jaxinfer params: config mapping, weight readers and writer, the
converted format (docs/loading.md).

`load_model_config` and `load_params` accept either a Hugging Face directory or one written by
`python -m checkpoints.convert`; both read each parameter per device shard, straight into its
sharding.
"""

from checkpoints.hf_config import model_config_from_hf
from checkpoints.load import (checkpoint_g_idx_paths, checkpoint_quant, load_model_config,
                              load_params)

__all__ = ["checkpoint_g_idx_paths", "checkpoint_quant", "load_model_config", "load_params",
           "model_config_from_hf"]
