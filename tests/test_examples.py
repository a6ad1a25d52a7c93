"""The examples run as a newcomer runs them: the quickstart with no arguments, one-shot chat, the gate plot."""

import os
import subprocess
import sys

import pytest
from tiny_cli import build_tiny_cli_checkpoint

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, os.path.join(EXAMPLES, "shapes"))
import shapes_data  # noqa: E402


def run_example(script, *args, cwd, stdin=None, returncode=0, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600, input=stdin,
    )
    assert result.returncode == returncode, result.stderr[-4000:]
    return result.stdout if returncode == 0 else result


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return build_tiny_cli_checkpoint(tmp_path_factory.mktemp("examples") / "tiny-cli", seed=2)  # its replies are words


def test_quickstart_with_no_arguments_answers_and_writes_the_heat_map(tmp_path):
    output = run_example("quickstart.py", cwd=tmp_path)
    assert "Q: What color is the circle?" in output
    answer = output.split("A:", 1)[1].splitlines()[0].strip()
    # the default is the bundled shapes model (examples/shapes/model): the newcomer's first answer is right
    (circle,) = [shape for shape in shapes_data.EXAMPLE_SCENE if shape.shape == "circle"]
    assert answer == circle.color, output
    png = tmp_path / "cli_gates.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_bundled_image_is_the_example_scene():
    from PIL import Image, ImageChops

    bundled = Image.open(os.path.join(EXAMPLES, "shapes_example.png")).convert("RGB")
    assert ImageChops.difference(bundled, shapes_data.render_scene(shapes_data.EXAMPLE_SCENE)).getbbox() is None


def test_quickstart_with_a_model_path(tiny_checkpoint, tmp_path):
    output = run_example("quickstart.py", "--model", str(tiny_checkpoint), "--output", "gates.png", cwd=tmp_path)
    assert "A:" in output and (tmp_path / "gates.png").exists()


def greedy_reply(folder, images, question, max_new_tokens):
    """The reference: the processor's prompt and a plain greedy `generate`, decoded without special tokens."""
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[Image.open(path) for path in images], text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_chat_one_shot_streams_the_greedy_answer(tiny_checkpoint, tmp_path):
    image = os.path.join(EXAMPLES, "shapes_example.png")
    output = run_example(
        "chat.py", "--model", str(tiny_checkpoint), "--image", image, "--image", image, "--prompt", "Compare them.",
        "--max-new-tokens", "4", cwd=tmp_path,
    )
    expected = greedy_reply(tiny_checkpoint, [image, image], "Compare them.", 4)
    assert expected.strip() and output.strip() == expected.strip()


def test_plot_gates_for_an_image_set(tiny_checkpoint, tmp_path):
    image = os.path.join(EXAMPLES, "shapes_example.png")
    output = run_example(
        "plot_gates.py", "--model", str(tiny_checkpoint), "--images", image, image, "--output", "map.png", cwd=tmp_path
    )
    assert "wrote map.png" in output and (tmp_path / "map.png").exists()


def test_chat_reports_bad_images_and_reset_keeps_the_start_images(tiny_checkpoint, tmp_path):
    image = os.path.join(EXAMPLES, "shapes_example.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    session = "\n".join(["/image /no/such/picture.png", f"/image {broken}", "Compare them.", "/reset", "Compare them.", ""])
    output = run_example(
        "chat.py", "--model", str(tiny_checkpoint), "--image", image, "--max-new-tokens", "4", cwd=tmp_path, stdin=session
    )
    assert "(cannot open image '/no/such/picture.png': " in output and f"(cannot open image '{broken}': " in output
    assert "(new conversation; the 1 --image image(s) go with your next message)" in output
    expected = greedy_reply(tiny_checkpoint, [image], "Compare them.", 4).strip()
    replies = [line.split("cli> ", 1)[1].strip() for line in output.splitlines() if "cli> " in line]
    assert expected and replies == [expected, expected]  # after /reset: the same question about the same image


def test_chat_with_a_bad_image_at_start_says_so_without_a_traceback(tiny_checkpoint, tmp_path):
    result = run_example(
        "chat.py", "--model", str(tiny_checkpoint), "--image", "missing.png", "--prompt", "Hi", cwd=tmp_path,
        returncode=2,
    )
    assert "error: cannot open image 'missing.png': " in result.stderr and "Traceback" not in result.stderr


def test_plot_gates_default_file_is_not_the_quickstarts(tiny_checkpoint, tmp_path):
    image = os.path.join(EXAMPLES, "shapes_example.png")
    output = run_example("plot_gates.py", "--model", str(tiny_checkpoint), "--images", image, cwd=tmp_path)
    assert "wrote cli_gate_map.png" in output and (tmp_path / "cli_gate_map.png").exists()
    assert not (tmp_path / "cli_gates.png").exists()  # the quickstart's heat map is left alone


def test_finetune_output_is_the_model_alone_with_normal_permissions(tmp_path):
    import json
    import stat

    output, temporary = tmp_path / "out", tmp_path / "tmp"
    temporary.mkdir()
    run_example("finetune.py", "--output", str(output), "--max-steps", "2", "--num-examples", "8", cwd=tmp_path,
                env={"TMPDIR": str(temporary)})
    names = sorted(os.listdir(output))
    assert "_work" not in names and all(not (output / name).is_dir() for name in names), names
    assert {"model.safetensors", "config.json", "tokenizer.json", "processing_cli.py"} <= set(names)
    config_mode = stat.S_IMODE((output / "config.json").stat().st_mode)
    assert stat.S_IMODE((output / "model.safetensors").stat().st_mode) == config_mode  # not safetensors' 0600
    umask = os.umask(0)
    os.umask(umask)
    assert config_mode == 0o666 & ~umask  # what any new file gets here
    tokenizer_config = json.loads((output / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only", "name_or_path"} & set(tokenizer_config)
    assert os.listdir(temporary) == []  # the demo's base model, data and Trainer folder are gone too


def test_the_readme_use_snippet_runs_as_written(tiny_checkpoint, tmp_path):
    readme = open(os.path.join(os.path.dirname(EXAMPLES), "README.md"), encoding="utf-8").read()
    snippet = readme.split("## Use\n\n```python\n", 1)[1].split("```", 1)[0]
    image = os.path.join(EXAMPLES, "shapes_example.png")
    assert '"path/to/converted-CLI-7B"' in snippet and '"photo.jpg"' in snippet
    code = snippet.replace('"path/to/converted-CLI-7B"', repr(str(tiny_checkpoint))).replace('"photo.jpg"', repr(image))
    code = code.replace("max_new_tokens=64", "max_new_tokens=3").replace('"max_new_tokens": 64', '"max_new_tokens": 3')
    code += (
        "\nassert chat.model is model  # the pipeline reuses the loaded model\n"
        "assert gates.shape == (len(model.config.llm_injection_layers), 1, len(model.config.vision_extraction_layers))\n"
        "assert not gates.requires_grad\n"
        "print('SNIPPET OK')\n"
    )
    script = tmp_path / "use.py"
    script.write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "SNIPPET OK" in result.stdout, result.stderr[-4000:]
