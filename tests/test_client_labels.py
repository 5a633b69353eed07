"""Folder names as class labels (--labels-from-dirs)."""

from __future__ import annotations

from client.labels import ClassLabels, label_key

FASHION = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def test_a_folder_is_named_by_the_class_it_stands_for() -> None:
    labels = ClassLabels(FASHION)
    assert labels.canonical("Ankle_boot") == "Ankle boot"
    assert labels.canonical("ankle-boot") == "Ankle boot"
    assert labels.canonical("T-shirt_top") == "T-shirt/top"
    assert labels.canonical("Shirt") == "Shirt"  # not T-shirt/top: only the whole name counts


def test_a_folder_that_names_no_class_keeps_its_name() -> None:
    assert ClassLabels(FASHION).canonical("cats") == "cats"
    assert ClassLabels().canonical("Ankle_boot") == "Ankle_boot"  # labels unknown
    assert not ClassLabels()


def test_keys_ignore_case_punctuation_and_unicode_forms() -> None:
    assert label_key("Ａnkle_Boot") == label_key("ankle boot") == "ankleboot"
