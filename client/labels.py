"""Folder names as class labels: with --labels-from-dirs, ``T-shirt_top/`` and ``Ankle_boot/``
stand for the classes ``T-shirt/top`` and ``Ankle boot`` (a ``/`` cannot be part of a folder
name, and many datasets spell spaces as ``_``). A name and a label match when they are equal
after case folding and dropping everything but letters and digits."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable


def label_key(label: str) -> str:
    """The form in which a folder name and a class label are compared."""
    text = unicodedata.normalize("NFKC", label).casefold()
    return "".join(ch for ch in text if ch.isalnum())


class ClassLabels:
    """The served model's class labels, to name each folder by the class it stands for."""

    def __init__(self, labels: Iterable[str] = ()) -> None:
        self._by_key = {label_key(label): label for label in labels}

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def canonical(self, folder: str) -> str:
        """The class label ``folder`` names, or ``folder`` itself when it names none."""
        return self._by_key.get(label_key(folder), folder)
