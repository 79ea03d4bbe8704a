"""The folder source lists samples and class indices exactly as torchvision's ImageFolder."""
import os

import numpy as np
from PIL import Image

from loaders.sources import ImageFolderSource

# '-', '+', ' ' and '.' sort before '/': a depth-first walk puts "a/x/..." before "a-b/...",
# torchvision's sorted(os.walk(...)) puts it after
TREE = ["cat/a/x/1.png", "cat/a/3.png", "cat/a-b/2.png", "cat/a+c/y/z/4.png", "cat/a b/5.JPG", "cat/a.d/6.png",
        "cat/0.png", "cat/a/x-1/7.png", "cat/a/x/sub/8.png", "dog-x/9.png", "dog/b/10.png", "dog/b.c/11.png",
        "dog/12.png", "Zebra/13.png"]


def test_folder_order_and_classes_match_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder
    for k, rel in enumerate(TREE):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(p, "PNG" if rel.endswith(".png") else "JPEG")
    (tmp_path / "cat" / "a" / "notes.txt").write_text("not an image")
    tv = ImageFolder(str(tmp_path))
    src = ImageFolderSource(root=tmp_path)
    assert src.classes == tv.classes
    assert [src.path(i) for i in range(len(src))] == [os.path.normpath(p) for p, _ in tv.samples]
    assert src.labels().tolist() == [t for _, t in tv.samples]
    # the case that differed: the sibling with '-' comes before the nested folder
    rel = [os.path.relpath(src.path(i), tmp_path) for i in range(len(src))]
    assert rel.index("cat/a-b/2.png") < rel.index("cat/a/x/1.png")
