"""
CLI under torch.distributed: what FSDP wrap policies read (`_no_split_modules`), DDP through the Trainer
(`examples/finetune.py` under torchrun) and FSDP2 (`examples/train_fsdp.py`) on two gloo processes against one process,
and where every parameter is read (DeepSpeed ZeRO-3 gathers parameters per module, for that module's forward).

The multi-process tests start their own processes on the loopback (a free port on 127.0.0.1), one thread each, with a
deadline, and leave nothing running.
"""

import pytest
import torch
from tiny_cli import build_tiny_cli

AGF_FORMS = ["attention", "folded"]


# ----------------------------------------------------------------------------------------------------------------------
# _no_split_modules: what FSDP wrap policies wrap
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agf_form", AGF_FORMS)
def test_no_split_modules_name_only_classes_the_model_holds(agf_form):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model, _ = build_tiny_cli(agf_form=agf_form)
    for candidate in (model, build_tiny_cli()[0].fold_agf()) if agf_form == "folded" else (model,):
        classes = {type(module).__name__ for module in candidate.modules()}
        names = set(candidate._no_split_modules)
        assert names <= classes, f"named but absent: {sorted(names - classes)}"
        assert {"Qwen2DecoderLayer", "SiglipEncoderLayer", "CLIAdaptiveGatingFusion"} <= names
        # accelerate's FSDP2 transformer-based wrap policy, which stops at a name no module has
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        policy = fsdp2_prepare_auto_wrap_policy(plugin, candidate)
        wrapped = [name for name, module in candidate.named_modules() if policy(module)]
        agf = [f"model.language_model.agf.{layer}" for layer in candidate.config.llm_injection_layers]
        decoder = [f"model.language_model.layers.{i}" for i in range(candidate.config.text_config.num_hidden_layers)]
        assert set(agf + decoder) <= set(wrapped)


def test_no_split_modules_of_the_remote_code_class(tmp_path):
    from accelerate.utils.dataclasses import get_module_class_from_name
    from tiny_cli import build_tiny_cli_checkpoint
    from transformers import AutoModelForImageTextToText

    folder = build_tiny_cli_checkpoint(tmp_path / "cli-dist-no-split", seed=0)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules.")
    for name in model._no_split_modules:
        assert get_module_class_from_name(model, name) is not None, name
