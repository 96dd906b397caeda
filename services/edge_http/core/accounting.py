"""Settling what a request used against what admission reserved for it.

A generation reserves its prompts plus every choice at its max_tokens before it costs anything;
once its runs end, the reservation is settled with the tokens really used (so the key's tokens
per minute count usage, not estimates), and the audit record notes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.edge_http.core.context import RequestRecord

# Called once with the tokens used (None if unknown: nothing is given back).
Settle = Callable[[int | None], Awaitable[None]]


def audited(settle: Settle, record: RequestRecord) -> Settle:
    """The settlement, also noting the tokens used on the request's audit record."""

    async def account(used: int | None) -> None:
        record.tokens = used
        await settle(used)

    return account


def shared_settlement(settle: Settle, run_prompts: list[int], prompt_tokens: int) -> list[Settle]:
    """One settlement for the runs of a request (`n` > 1, several prompts), made once all have
    reported, each with its own prompt's size in `run_prompts`: every prompt counted once
    (`prompt_tokens`), as in the response's usage (None if any run's use is unknown)."""
    reported: dict[int, int | None] = {}

    def part(index: int) -> Settle:
        async def report(used: int | None) -> None:
            reported[index] = used
            if len(reported) < len(run_prompts):
                return
            if any(value is None for value in reported.values()):
                await settle(None)
                return
            completions = sum(used - run_prompts[i] for i, used in reported.items())  # type: ignore[operator]
            await settle(prompt_tokens + completions)

        return report

    return [part(index) for index in range(len(run_prompts))]
