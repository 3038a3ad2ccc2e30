"""`exolaunch import` (registered on the typer app in launcher.cli_common)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from launcher.cli_common import app
from launcher.errors import ConfigError


@app.command(
    "import",
    help="Turn a GGUF file (or a packaged model: smollm2) into an mlx-lm model directory: tensors renamed to "
         "mlx-lm's layout, config.json, tokenizer.json and chat template from the GGUF metadata, safetensors with "
         "their index. Kept 4/8-bit quantized (--dtype keep) or dequantized. Without --out it goes into the model "
         "cache, where `run`/`plan`/`pull FILE.gguf` find it. Prints the directory. Exit 0, or 2 with one line "
         "saying why (tensor types mlx cannot read such as K-quants, unknown architectures).",
)
def import_(
    file: str = typer.Argument(..., metavar="FILE.gguf", help="A .gguf file, or a packaged model name (smollm2)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the directory here (default: the model cache, "
                                                          "$EXOLAUNCH_CACHE/models)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | keep (stay quantized as in the "
                                                             "file). Default: float32 (faster than 4-bit on CPU)."),
):
    from runtime import gguf

    if dtype is not None and dtype not in gguf.DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(gguf.DTYPES)}.")
    try:
        if file in gguf.PACKAGED:
            path = gguf.package_gguf(file)
            if path is None:
                raise gguf.missing_package(file)
            dtype = dtype or gguf.PACKAGED[file].dtype
        else:
            path = Path(file).expanduser()
            if not path.is_file():
                raise ConfigError(f"{file}: no such file. Fix: pass a .gguf file or a packaged model "
                                  f"({', '.join(gguf.PACKAGED)}).")
        dtype = dtype or gguf.DEFAULT_DTYPE
        done = gguf.convert(path, out, dtype) if out is not None else gguf.ensure(path, dtype)
    except gguf.GGUFError as e:
        raise ConfigError(str(e)) from None
    typer.echo(str(done))
