"""Write small notebooks (MyST Markdown sources, as the study's) for the runner and config tests."""

import jupytext
import nbformat


SHARED_CELL = "\n".join(
    [
        "profile = 'cpu'",
        "seed = 0",
        "device = 'auto'",
        "dataset = 'fashion_mnist'",
        "model = 'smallcnn'",
        "epochs = 1",
        "batch_size = 8",
        "lr = 0.1",
        "n_train = None",
    ]
)


def write_notebook(path, parameters: str, *code: str) -> None:
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params] + [nbformat.v4.new_code_cell(c) for c in code])
    nb.metadata["kernelspec"] = {"name": "tamperbench", "display_name": "Python (tamperbench)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    jupytext.write(nb, path, fmt="md:myst")
