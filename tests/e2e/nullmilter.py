"""A milter that does nothing (accepts every message, no edits): ``python -m tests.e2e.nullmilter SOCKET``.

It shows what Postfix does to a message because *a* milter is configured, whatever the milter: Postfix's
cleanup cuts any header to 60,000 bytes as soon as one is (libmilter's request limit is 65,535 bytes)."""

from __future__ import annotations

import sys

import Milter


class NullMilter(Milter.Base):  # type: ignore[misc]
    def eom(self) -> int:
        return int(Milter.ACCEPT)


def main() -> None:
    Milter.factory = NullMilter
    Milter.runmilter("nullmilter", sys.argv[1], 30)


if __name__ == "__main__":
    main()
