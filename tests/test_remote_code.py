"""save_pretrained -> from_pretrained(trust_remote_code=True) in a fresh, offline process without the project installed."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from test_modeling import single_image_inputs
from tiny_models import native_twin, randomize_cli_modules, tiny_cli_model

# The child process must find our code only in the saved folder: importing the installed modules is made to fail.
BLOCK_PROJECT_IMPORTS = "import sys\nfor name in ('configuration_cli', 'modeling_cli', 'processing_cli'):\n    sys.modules[name] = None\n"


def run_offline(code: str, cwd) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PROJECT_IMPORTS + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_saved_folder_loads_as_remote_code_in_a_fresh_offline_process(tmp_path):
    model = tiny_cli_model(seed=21)
    randomize_cli_modules(model, seed=22)
    inputs = single_image_inputs(native_twin(model), (150, 40), seed=23)
    folder = tmp_path / "tiny-cli"
    model.save_pretrained(folder)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.save(expected, tmp_path / "expected.pt")

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "cli"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cli.CLIConfig",
        "AutoModel": "modeling_cli.CLIForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_cli.CLIForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_cli.CLIForConditionalGeneration",
    }
    assert {"configuration_cli.py", "modeling_cli.py", "processing_cli.py"} <= set(os.listdir(folder))

    output = run_offline(
        f"""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
        folder = {str(folder)!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
        for auto_class in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
            model = auto_class.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
            assert type(model).__name__ == "CLIForConditionalGeneration", type(model)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(**inputs).logits
        print("MAXDIFF", (logits - expected).abs().max().item())
        """,
        tmp_path,
    )
    max_diff = float(output.split("MAXDIFF")[1].split()[0])
    assert max_diff <= 1e-5
