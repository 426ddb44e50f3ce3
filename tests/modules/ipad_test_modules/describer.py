"""Modules that describe themselves badly: too big, too deep, or falsely (tests).

The worker host reads a module's description from its annotations, but the
module's own code runs in that worker first and can put anything in its
place: ``Lying`` replaces its own entry in the host's table of descriptions
(ipad/worker/host.py ``_METHOD_SPECS``) with one that contradicts its real
methods, refers to itself forever and holds junk where schemas belong. Each
class is the entry point of one manifest (``describer_*.toml``).
"""

from __future__ import annotations

import inspect
from typing import Any

import attrs

from ipad.ipa import IPAModule
from ipad.protocol import wire as p
from ipad.worker import host

__version__ = "1.0.0"

#: Nested lists: more levels than the daemon accepts in one schema.
Deep: Any = int
for _ in range(40):
    Deep = list[Deep]

#: A docstring of 200 KB: READY still fits a packet, and the daemon cuts it.
HUGE_DOC = "d" * 200_000


class Huge(IPAModule):
    """A 200 KB docstring on a method, and a hundred parameters on another."""

    def ping(self) -> str:
        """Answer."""
        return "pong"

    def many(self, **kwargs: Any) -> int:
        """How many arguments it was given."""
        return len(kwargs)


Huge.ping.__doc__ = HUGE_DOC
# A hundred described parameters: past the daemon's bound on parameters per method.
Huge.many.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
    + [
        inspect.Parameter(f"p{n}", inspect.Parameter.KEYWORD_ONLY, default=0, annotation=int)
        for n in range(100)
    ]
)


class Nested(IPAModule):
    """A parameter whose schema nests 40 deep."""

    def ping(self) -> str:
        """Answer."""
        return "pong"

    def deep(self, value: Deep = None) -> int:
        """Ignore ``value``."""
        return 1


@attrs.frozen
class Reply:
    """What ``echo`` really returns."""

    text: str


class Lying(IPAModule):
    """Really takes ``echo(text: str)``; says it takes ``echo(text: integer)``."""

    def echo(self, text: str) -> Reply:
        """Return ``text``."""
        return Reply(text)

    def loop(self) -> dict[str, Any]:
        """A value whose described type refers to itself."""
        return {"next": {"next": {"next": None}}}


# Its own entry in the host's table, replaced before the host reads it at LOAD.
host._METHOD_SPECS[Lying] = (
    (
        p.MethodSpec("echo", params=(p.ParamSpec("text", {"type": "integer"}),),
                     result={"$ref": "#/$defs/Loop"}, doc="lies"),
        p.MethodSpec("loop", params=(), result={"$ref": "#/$defs/Loop"}, doc="loops"),
        p.MethodSpec("junk", params=(p.ParamSpec("x", {"type": 5, "anyOf": "no",
                                                       "properties": [1, 2]}),),
                     result={"type": ["object", 7]}),
    ),
    {
        "Loop": {"title": "Loop", "anyOf": [{"$ref": "#/$defs/Loop"}, {"$ref": "#/$defs/Node"}]},
        "Node": {"title": "class", "type": "object",
                 "properties": {"next": {"$ref": "#/$defs/Loop"}}},
    },
)  # fmt: skip
