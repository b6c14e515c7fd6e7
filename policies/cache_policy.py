"""The CachePolicy interface: which resident key goes when a tier needs room.

A policy only sees keys (any hashable); the tier owns the data, the sizes and
the locking, and calls the policy under its own lock. A user policy need not
subclass this: any object with these five methods will do.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Container, Hashable


class CachePolicy(ABC):
    @abstractmethod
    def insert(self, key: Hashable) -> None:
        """`key` became resident."""

    @abstractmethod
    def touch(self, key: Hashable) -> None:
        """A resident `key` was used."""

    @abstractmethod
    def remove(self, key: Hashable) -> None:
        """`key` left for a reason of the tier's own (deleted, corrupt); unknown keys are ignored."""

    @abstractmethod
    def evict(self, n: int, protected: Container = frozenset()) -> list:
        """Forget and return up to `n` victims, never one in `protected`."""

    @abstractmethod
    def clear(self) -> None:
        """Forget everything."""


POLICY_METHODS = ("insert", "touch", "remove", "evict", "clear")
