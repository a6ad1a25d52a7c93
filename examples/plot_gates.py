"""
Heat map of CLI's gate weights (LLM injection layer x vision extraction layer): the paper's "criss-cross" picture of
which vision layers each LLM layer draws on.

    python examples/plot_gates.py --model PATH_OR_REPO --images a.jpg b.png --question "What is shown?" --output gates.png

The default output is cli_gate_map.png (the quickstart writes cli_gates.png, so the two never overwrite each other).

Needs matplotlib (`pip install -e ".[plot]"`).
"""

import argparse

import torch
from PIL import Image


def gate_weights_for(model, processor, image, question: str) -> torch.Tensor:
    """Gates `(num_injection_layers, num_extraction_layers)` of one image + question, from the prefill pass."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model(**inputs, output_gate_weights=True)
    return output.gate_weights[:, 0].float().cpu()


def save_gate_heatmap(gates: torch.Tensor, config, path: str, title: str = "CLI gate weights") -> str:
    """Writes `gates` `(J, K)` as a PNG heat map with the layer indices of `config` on the axes; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = max(float(gates.abs().max()), 0.05)  # a symmetric scale; all-zero gates (an untrained model) read as 0
    figure, axes = plt.subplots(figsize=(max(4.5, 2.0 + 0.7 * gates.shape[1]), max(3.2, 1.6 + 0.45 * gates.shape[0])))
    image = axes.imshow(gates.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    axes.set_xticks(range(gates.shape[1]), [str(k) for k in config.vision_extraction_layers])
    axes.set_yticks(range(gates.shape[0]), [str(j) for j in config.llm_injection_layers])
    axes.set_xlabel("vision extraction layer k")
    axes.set_ylabel("LLM injection layer j")
    axes.set_title(title, fontsize=9)
    for row in range(gates.shape[0]):
        for column in range(gates.shape[1]):
            axes.text(column, row, f"{gates[row, column]:.2f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=axes, label="g = tanh(...)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


GATE_READING = (
    "Red: that LLM layer (row) adds that vision layer's features (column) to the image tokens (gate g > 0); "
    "blue: subtracts them (g < 0); white: leaves them out (g near 0)."
)


def save_gate_heatmaps(
    panels: list[tuple[str, torch.Tensor]], config, path: str, caption: str = GATE_READING, title: str | None = None
) -> str:
    """
    Writes several gate maps `(J, K)` side by side in one PNG on one shared colour scale (-1 to 1, the gates' range),
    each panel titled by its label, with `caption` as one line of text under the picture; returns `path`.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_rows, num_cols = panels[0][1].shape
    width = max(3.2, 1.6 + 0.75 * num_cols)
    figure_width = width * len(panels) + 1.2
    caption_lines = textwrap.wrap(caption, int(figure_width * 13))  # ~13 characters an inch at 7.5 pt
    figure, axes = plt.subplots(
        1, len(panels), figsize=(figure_width, max(3.2, 2.0 + 0.45 * num_rows) + 0.15 * len(caption_lines)),
        squeeze=False,
    )
    for axis, (label, gates) in zip(axes[0], panels):
        image = axis.imshow(gates.numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")
        axis.set_xticks(range(gates.shape[1]), [str(k) for k in config.vision_extraction_layers])
        axis.set_yticks(range(gates.shape[0]), [str(j) for j in config.llm_injection_layers])
        axis.set_xlabel("vision extraction layer k")
        axis.set_title("\n".join(textwrap.wrap(label, 30)), fontsize=9)
        for row in range(gates.shape[0]):
            for column in range(gates.shape[1]):
                value = float(gates[row, column])
                axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="white" if abs(value) > 0.6 else "black")
    axes[0][0].set_ylabel("LLM injection layer j")
    if title:
        figure.suptitle(title, fontsize=10)
    bottom = 0.22 + 0.05 * len(caption_lines)
    figure.subplots_adjust(left=0.9 / figure_width, right=1.0 - 1.1 / figure_width, bottom=bottom, top=0.8, wspace=0.35)
    colorbar_axis = figure.add_axes([1.0 - 0.9 / figure_width, bottom, 0.15 / figure_width, 0.8 - bottom])
    figure.colorbar(image, cax=colorbar_axis, label="gate g")
    figure.text(0.5, 0.02, "\n".join(caption_lines), ha="center", va="bottom", fontsize=7.5)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a CLI checkpoint folder or Hub repo id")
    parser.add_argument("--images", nargs="+", required=True, help="image files; the map averages over them")
    parser.add_argument("--question", default="Describe the image.")
    parser.add_argument("--output", default="cli_gate_map.png", help="PNG to write (default: cli_gate_map.png)")
    args = parser.parse_args(argv)

    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    gates = torch.stack(
        [gate_weights_for(model, processor, Image.open(path), args.question) for path in args.images]
    ).mean(0)
    title = f"CLI gates, mean over {len(args.images)} image(s)"
    print(f"wrote {save_gate_heatmap(gates, model.config, args.output, title)}")


if __name__ == "__main__":
    main()
