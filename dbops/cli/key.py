"""`dbops key generate`: a new encryption key (see docs/encryption.md)."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from dbops.cli import output
from dbops.errors import PreconditionError
from dbops.storage import keys

key_app = typer.Typer(help="Encryption keys for storage.encryption.", no_args_is_help=True)


@key_app.command("generate")
def generate(
    out: Annotated[Optional[str], typer.Option(
        "--out", "-o", help="Write the key to this new file (mode 0600) instead of stdout")] = None,
) -> None:
    """Print a new random 256-bit key (base64), or write it to a new private file; its key ID goes to stderr."""
    text = keys.generate()
    kid = keys.key_id(keys.decode_key(text) or b"")
    if out is None:
        output.out(text)
    else:
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise PreconditionError(f"{out} exists already; not overwriting a key file",
                                    hint="a replaced key makes everything sealed with it unreadable") from None
        except OSError as e:
            raise PreconditionError(f"cannot create {out}: {e.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
    output.err(f"key ID {kid}" + (f" written to {out}" if out else "")
               + "; keep a copy apart from the bucket: without the key the backups cannot be read")


def register(app: typer.Typer) -> None:
    app.add_typer(key_app, name="key")
