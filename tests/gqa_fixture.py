"""Write Shapes-world samples in GQA's published layout (questions JSON, images folder, scene
graphs), so the GQA loader can be checked against the samples it came from."""

from __future__ import annotations

import json
from pathlib import Path

from microscope.data.vqa import word_spans

#: (structural, semantic, detailed) written for each Shapes category: a detailed type the knockout
#: paper files under that category, so both groupings give the Shapes category back
TYPES = {"ChooseAttr": ("choose", "attr", "chooseAttr"), "QueryAttr": ("query", "attr", "positionQuery"),
         "ChooseCat": ("choose", "cat", "categoryThisChoose"), "LogicalObj": ("logical", "obj", "existThatOr"),
         "ChooseRel": ("choose", "rel", "relChooser"), "CompareAttr": ("compare", "attr", "twoCommon")}


def write_gqa(samples, root: Path) -> dict[str, Path]:
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    qs, graphs = {}, {}
    for k, s in enumerate(samples):
        image_id = f"n{k}"
        s.image.save(root / "images" / f"{image_id}.png")
        spans = word_spans(s.question)
        ann = {}
        for j, c in enumerate(s.constraints):
            w = next(i for i, (a, b) in enumerate(spans) if a <= c.start < b)
            ann[str(w)] = f"o{s.referred[j]}" if j < len(s.referred) else f"x{j}"
        st, se, de = TYPES[s.category]
        qs[s.id] = {"question": s.question, "answer": s.answer, "imageId": image_id,
                    "types": {"structural": st, "semantic": se, "detailed": de}, "annotations": {"question": ann}}
        graphs[image_id] = {"width": s.image_size, "height": s.image_size, "objects": {
            f"o{i}": {"name": o.shape, "x": o.box[0], "y": o.box[1], "w": o.box[2] - o.box[0],
                      "h": o.box[3] - o.box[1]} for i, o in enumerate(s.objects)}}
    (root / "questions.json").write_text(json.dumps(qs))
    (root / "graphs.json").write_text(json.dumps(graphs))
    return {"questions": root / "questions.json", "images": root / "images", "scene_graphs": root / "graphs.json",
            "image_ext": ".png"}
