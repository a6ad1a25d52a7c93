"""The examples run as a newcomer runs them: the quickstart with no arguments, one-shot chat, the gate plot."""

import os
import subprocess
import sys

import pytest
from tiny_cli import build_tiny_cli_checkpoint

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, os.path.join(EXAMPLES, "shapes"))
import shapes_data  # noqa: E402


def run_example(script, *args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


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
