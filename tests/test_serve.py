"""
examples/serve.py: CLI behind transformers' own OpenAI-compatible server, asked with the `openai` client.

One server process for the module: the bundled shapes model on 127.0.0.1 and a free port, `--continuous-batching`
requested (CLI falls back to sequential generation, which the server logs), `CLI_IMAGE_TIMEOUT=2`. Served answers are
compared with `generate()` called directly on the same model folder with the same conversation.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
MODEL = "examples/shapes/model"  # as given on the command line: the name requests use
BUNDLED_IMAGE = os.path.join(EXAMPLES, "shapes_example.png")
BUNDLED_QUESTION = "What color is the circle?"  # the quickstart's question; the bundled model answers "blue"
MAX_TOKENS = 6
IMAGE_TIMEOUT_S = 2
sys.path.insert(0, EXAMPLES)
sys.path.insert(0, os.path.join(EXAMPLES, "shapes"))
import serve  # noqa: E402
import shapes_data  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python examples/serve.py MODEL ...` in a subprocess; yields (base_url, log path); stopped at the end."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CLI_IMAGE_TIMEOUT": str(IMAGE_TIMEOUT_S)}
    command = [sys.executable, os.path.join(EXAMPLES, "serve.py"), MODEL, "--host", "127.0.0.1", "--port", str(port),
               "--continuous-batching"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log_path.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                    if json.load(response) == {"status": "ok"}:
                        break
            except OSError:
                time.sleep(0.5)
        yield base_url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def reference():
    """`generate()` on the same folder, loaded in this process: greedy, `MAX_TOKENS` new tokens, special tokens dropped."""
    model = AutoModel.from_pretrained(os.path.join(ROOT, MODEL), trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(os.path.join(ROOT, MODEL), trust_remote_code=True)

    def answer(content: list) -> str:
        messages = [{"role": "user", "content": content}]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return answer


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_item(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_item(text: str) -> dict:
    return {"type": "text", "text": text}


def ask(client, content, **options):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, temperature=0, **options
    )


def bundled_image() -> Image.Image:
    return Image.open(BUNDLED_IMAGE).convert("RGB")


def test_image_text_and_streamed_answers_equal_generate(client, reference):
    image = bundled_image()
    expected = reference([{"type": "image", "image": image}, text_item(BUNDLED_QUESTION)])
    assert expected == "blue"  # the quickstart's answer: the reference itself is the right one

    response = ask(client, [image_item(data_url(image)), text_item(BUNDLED_QUESTION)])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop" and response.usage.completion_tokens >= 1

    stream = ask(client, [image_item(data_url(image)), text_item(BUNDLED_QUESTION)], stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected

    for question in ("How many squares are there?", "Is the circle on the left?"):
        response = ask(client, [image_item(data_url(image)), text_item(question)])
        assert response.choices[0].message.content == reference([{"type": "image", "image": image}, text_item(question)])

    # two images in one message (the multi-image treatment: base view + newline each)
    other = shapes_data.generate_examples(1, seed=3)[0]["images"][0]
    question = "How many squares are there?"
    response = ask(client, [image_item(data_url(image)), image_item(data_url(other)), text_item(question)])
    expected = reference([{"type": "image", "image": image}, {"type": "image", "image": other}, text_item(question)])
    assert response.choices[0].message.content == expected

    # text only: a plain string content, as most clients send it
    response = ask(client, BUNDLED_QUESTION)
    assert response.choices[0].message.content == reference([text_item(BUNDLED_QUESTION)])


def test_eight_concurrent_mixed_requests_are_all_answered_right(client, reference, server):
    examples = shapes_data.generate_examples(8, seed=0)  # colour, count and left-of questions, cycling
    assert {example["kind"] for example in examples} == set(shapes_data.QUESTION_KINDS)

    def request(example):
        return ask(client, [image_item(data_url(example["images"][0])), text_item(example["question"])])

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(request, examples))
    assert len({response.id for response in responses}) == 8
    for example, response in zip(examples, responses):
        answer = response.choices[0].message.content
        assert answer == reference([{"type": "image", "image": example["images"][0]}, text_item(example["question"])])
        assert answer == example["answer"], example["question"]
    log = server[1].read_text()
    assert "does not support continuous batching. Falling back to sequential generation." in log


@pytest.fixture(scope="module")
def silent_image_url():
    """An http URL whose server accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held, stop = [], threading.Event()

    def accept():  # holds each connection for 30 s at most, so that a server without a timeout is stuck no longer
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append((listener.accept()[0], time.monotonic()))
            except OSError:
                pass
            while held and time.monotonic() - held[0][1] > 30:
                held.pop(0)[0].close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/image.png"
    stop.set()
    thread.join()
    for connection, _ in held:
        connection.close()
    listener.close()


BAD_REQUESTS = {
    # case: (request content or options, text the 400's message must hold)
    "undecodable image": ([image_item("data:image/png;base64," + base64.b64encode(b"not a png").decode()),
                           text_item("What?")], "Cannot read image"),
    "more image markers than images": ([image_item("BUNDLED"), text_item("<image>\nWhat color is the circle?")],
                                       "2 <image> marker(s) but 1 image(s)"),
    "image marker without an image": ([text_item("<image>\nWhat color is the circle?")], "no images were passed"),
    "prompt over the model's length": ([text_item("word " * 2100)], "over this model's 2048 positions"),
    "video item": ([{"type": "video_url", "video_url": {"url": "http://127.0.0.1:9/clip.mp4"}}, text_item("What?")],
                   "video items are not supported"),
    "audio item": ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, text_item("What?")],
                   "audio items are not supported"),
    "unknown model name": ({"model": "not/this-model"}, "Server is pinned to 'examples/shapes/model'"),
    "image URL that never answers": ([image_item("SILENT"), text_item("What?")], "Cannot download image"),
    # a path on the server's disk is neither read nor probed: the same answer whether the file exists or not
    "a file on the server's disk": ([image_item(BUNDLED_IMAGE), text_item("What?")],
                                    "local file paths are not read here"),
    "a missing file on the server's disk": ([image_item("/no/such/image.png"), text_item("What?")],
                                            "local file paths are not read here"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_400_with_its_message_and_the_server_keeps_serving(case, client, silent_image_url):
    content, message = BAD_REQUESTS[case]
    options = {}
    if isinstance(content, dict):
        options, content = content, BUNDLED_QUESTION
    urls = {"BUNDLED": data_url(bundled_image()), "SILENT": silent_image_url}
    content = [image_item(urls[item["image_url"]["url"]]) if item.get("image_url", {}).get("url") in urls else item
               for item in content] if isinstance(content, list) else content
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**{"model": MODEL, "messages": [{"role": "user", "content": content}],
                                          "max_tokens": MAX_TOKENS, **options})
    assert error.value.status_code == 400
    assert message in error.value.response.text, error.value.response.text
    if case == "image URL that never answers":
        assert time.monotonic() - started < IMAGE_TIMEOUT_S + 10
    # the next good request is answered
    response = ask(client, [image_item(data_url(bundled_image())), text_item(BUNDLED_QUESTION)])
    assert response.choices[0].message.content == "blue"


def test_streamed_prompt_over_the_length_ends_the_stream_with_the_error(client):
    """A streamed response has sent its 200 before generation starts: the model's error arrives as an SSE error event."""
    with pytest.raises(openai.APIError) as error:
        list(ask(client, [text_item("word " * 2100)], stream=True))
    assert "over this model's 2048 positions" in str(error.value.body)
    assert ask(client, BUNDLED_QUESTION).choices[0].message.content  # still serving


def test_a_model_a_request_names_cannot_run_its_code(server, client, tmp_path):
    """`/load_model` loads any model a client names; the server runs with trust_remote_code=False (only CLI's folder is
    trusted, through registration), so a folder with remote code is refused instead of executed."""
    marker = tmp_path / "code_ran"
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel", "AutoProcessor": "evil.EvilProcessor"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"auto_map": {"AutoProcessor": "evil.EvilProcessor"}}))
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    request = urllib.request.Request(f"{server[0]}/load_model", data=json.dumps({"model": str(tmp_path)}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        events = response.read().decode()
    assert '"status": "error"' in events and "contains custom code" in events, events
    assert not marker.exists()
    assert ask(client, BUNDLED_QUESTION).choices[0].message.content  # still serving


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "llava_onevision"}, "is not a CLI checkpoint"),
        ({"model_type": "cli", "auto_map": {"AutoConfig": "configuration_cli.CLIConfig", "AutoModel": "evil.Model"}},
         "maps a class to 'evil.Model'"),
        ({"model_type": "cli", "auto_map": {"AutoModel": "someone/repo--modeling_cli.CLIForConditionalGeneration"}},
         "maps a class to 'someone/repo--modeling_cli"),
    ],
)
def test_launcher_refuses_a_folder_that_is_not_cli_before_running_its_code(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "evil.py").write_text("raise SystemExit('evil code ran')\n")
    with pytest.raises(ValueError, match=message):
        serve.register_cli_classes(str(tmp_path))


def test_bench_serve_load_generator_counts_what_the_server_generated(server):
    """benchmarks/bench_serve.py's `measure` against this module's server: every request answered, exactly
    `new_tokens` generated each (min_new_tokens through the request's generation_config), percentiles as numpy's."""
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_serve

    result = bench_serve.measure(server[0], MODEL, bench_serve.request_images("shapes", 3), concurrency=2, new_tokens=5)
    assert result["requests"] == 3 and len(result["answers"]) == 3
    assert result["generated_tokens"] == 15
    assert result["latency_p50_s"] <= result["latency_p95_s"] <= result["wall_s"]
    values = sorted([0.3, 0.1, 0.7, 0.2, 0.9])
    for q in (50, 95):
        assert bench_serve.percentile(values, q) == pytest.approx(np.percentile(values, q))
