"""Real data-set loaders on tiny fixture files in each published layout, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import microscope
from microscope import grid
from microscope.data import gqa, load_samples, scienceqa, vqa_constraints
from microscope.data.vqa import DatasetError, DatasetWarning
from microscope.grid import box_patches


def _img(path, w=120, h=80, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)


@pytest.fixture()
def gqa_files(tmp_path):
    qs = {
        "101": {"question": "Is the cup on the table red or blue?", "answer": "red", "imageId": "n1",
                "types": {"structural": "choose", "semantic": "attr", "detailed": "chooseAttr"},
                "annotations": {"question": {"2": "o1", "5": "o2"}, "answer": {}, "fullAnswer": {}}},
        "102": {"question": "What color is the tall lamp?", "answer": "yellow", "imageId": "n2",
                "types": {"structural": "query", "semantic": "attr", "detailed": "queryAttr"},
                "annotations": {"question": {"4:6": "o3"}}},
        "103": {"question": "Is it overcast?", "answer": "no", "imageId": "n1",
                "types": {"structural": "verify", "semantic": "global", "detailed": "verifyGlobal"},
                "annotations": {"question": {}}},
    }
    graphs = {"n1": {"width": 120, "height": 80, "objects": {"o1": {"name": "cup", "x": 20, "y": 0, "w": 10, "h": 10},
                                                             "o2": {"name": "table", "x": 20, "y": 40, "w": 80,
                                                                    "h": 40}}},
              "n2": {"width": 120, "height": 80, "objects": {"o3": {"name": "lamp", "x": 100, "y": 0, "w": 20,
                                                                    "h": 80}}}}
    (tmp_path / "questions.json").write_text(json.dumps(qs))
    (tmp_path / "graphs.json").write_text(json.dumps(graphs))
    _img(tmp_path / "images" / "n1.jpg")
    _img(tmp_path / "images" / "n2.jpg", color=(240, 240, 240))
    return tmp_path


def test_gqa_categories_constraints_and_boxes(gqa_files):
    d = gqa_files
    # the knockout paper's categories (by detailed type): queryAttr is not its QueryAttr (positionQuery only)
    assert [x.id for x in gqa.load(d / "questions.json", d / "images")] == ["101"]
    s = gqa.load(d / "questions.json", d / "images", scene_graphs=d / "graphs.json", grouping="broad")
    assert [x.id for x in s] == ["101", "102"]  # VerifyGlobal is not one of the six
    a, b = s
    assert (a.category, b.category) == ("ChooseAttr", "QueryAttr")
    assert [c.word for c in a.constraints] == ["cup", "table"]
    assert all(a.question[c.start:c.end] == c.word for c in a.constraints)
    assert [c.word for c in b.constraints] == ["tall lamp"]  # the "4:6" word range, "?" excluded
    assert a.boxes == ((20, 0, 30, 10), (20, 40, 100, 80))
    assert a.image.size == (120, 80)
    every = gqa.load(d / "questions.json", d / "images", categories=None)
    assert [x.category for x in every] == ["ChooseAttr", "queryAttr", "verifyGlobal"]
    assert len(gqa.load(d / "questions.json", d / "images", n=1, seed=0, grouping="broad")) == 1


def test_box_patches_follow_clip_resize_and_centre_crop():
    assert box_patches((0, 0, 16, 16), 96, 96, 6) == (0,)
    assert box_patches((16, 16, 33, 32), 96, 96, 6) == (7, 8)
    # 200 x 100: the crop is the middle 100 x 100 (x from 50 to 150)
    assert box_patches((50, 0, 60, 10), 200, 100, 4) == (0,)
    assert box_patches((0, 0, 40, 100), 200, 100, 4) == ()  # entirely outside the crop
    assert box_patches((140, 90, 200, 100), 200, 100, 4) == (15,)


def test_gqa_samples_run_through_roles_and_knockout(gqa_files, handles):
    h = handles["llava15"]
    d = gqa_files
    s = load_samples("gqa", handle=h, questions=d / "questions.json", images=d / "images",
                     scene_graphs=d / "graphs.json", grouping="broad")
    # 120 x 80 image, centre crop x 20..100, grid 4 (cells of 20 px): the cup (x 20..30, y 0..10) is patch 0
    assert s[0].grid == 4 and 0 in s[0].referred_patches()
    batch = microscope.prepare_samples(h, s)
    cons = batch.role_mask("constraint")
    assert cons.sum().item() >= 3  # cup, table, tall lamp
    from microscope import knockout as ko

    src, _ = ko.edge_masks(h, batch, "related-image↛question", [x.referred_patches() for x in s])
    assert src[0].sum().item() == len(s[0].referred_patches())
    df = ko.predict(h, s, "image↛text", progress=False)
    assert len(df) == 2


def test_gqa_errors_name_the_file(gqa_files, tmp_path):
    d = gqa_files
    with pytest.raises(DatasetError, match="missing.json does not exist"):
        gqa.load(d / "missing.json", d / "images")
    with pytest.raises(DatasetError, match="images folder"):
        gqa.load(d / "questions.json", d / "nope")
    (d / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json is not valid JSON"):
        gqa.load(d / "bad.json", d / "images")
    # GQA's test questions carry no answer: the model's own answer is measured (answer=None)
    (d / "noanswer.json").write_text(json.dumps({"1": {"question": "Is it red?", "imageId": "n1",
                                                       "types": {"structural": "verify", "semantic": "attr",
                                                                 "detailed": "verifyAttr"}},
                                                 "2": {"answer": "no", "imageId": "n1"}}))
    with pytest.warns(DatasetWarning, match="skipped 1 of 2 rows"):
        s = gqa.load(d / "noanswer.json", d / "images", categories=None)
    assert [(x.id, x.answer) for x in s] == [("1", None)]
    assert s.skipped == [{"source": str(d / "noanswer.json"), "row": "2",
                          "reason": "no question text or imageId (a GQA question needs both)"}]
    with pytest.raises(DatasetError, match="no detailed question types.*grouping='broad'"):
        gqa.load(d / "graphs.json", d / "images")
    with pytest.raises(ValueError, match="unknown grouping 'paper'"):
        gqa.load(d / "questions.json", d / "images", grouping="paper")
    (d / "images" / "n2.jpg").unlink()
    s = gqa.load(d / "questions.json", d / "images", grouping="broad")
    with pytest.raises(DatasetError, match="n2.jpg does not exist"):
        _ = s[1].image


def test_scienceqa_keeps_image_questions_with_letter_answers(tmp_path):
    probs = {
        "7": {"question": "Which animal is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "Look.",
              "image": "image.png", "split": "test", "category": "Classification", "subject": "natural science"},
        "8": {"question": "What is 2+2?", "choices": ["3", "4"], "answer": 1, "hint": "", "image": None,
              "split": "test", "category": "Math"},
        "9": {"question": "Which is hotter?", "choices": ["ice", "lava", "snow"], "answer": 1, "hint": "",
              "image": "image.png", "split": "train", "category": "Physics"},
    }
    (tmp_path / "problems.json").write_text(json.dumps(probs))
    _img(tmp_path / "images" / "test" / "7" / "image.png")
    _img(tmp_path / "images" / "train" / "9" / "image.png")
    s = scienceqa.load(tmp_path / "problems.json", tmp_path / "images")
    assert [x.id for x in s] == ["7", "9"]
    assert s[0].answer == "B" and s[0].options == ("A", "B") and s[0].category == "Classification"
    assert s[0].question.splitlines() == ["Context: Look.", "Which animal is a mammal?", "A. frog", "B. whale",
                                          scienceqa.INSTRUCTION]
    assert s[1].image.size == (120, 80)
    assert [x.id for x in scienceqa.load(tmp_path / "problems.json", tmp_path / "images", splits=["train"])] == ["9"]
    probs["9"]["answer"] = 5  # one bad problem is skipped with its reason, not the whole file
    (tmp_path / "p2.json").write_text(json.dumps(probs))
    with pytest.warns(DatasetWarning, match="skipped 1 of 3 rows"):
        s = scienceqa.load(tmp_path / "p2.json", tmp_path / "images")
    assert [x.id for x in s] == ["7"] and s.skipped[0]["reason"] == "answer 5 is not one of its 3 choices"


def test_vqa_constraints_csv(tmp_path):
    (tmp_path / "movies.csv").write_text(
        "Question,Constraint,Image,Answer\n"
        "Who directed the movie in this poster?,the movie,posters/a.png,Nolan\n"
        "Which year was The Matrix released?,The Matrix,posters/b.png,1999\n")
    _img(tmp_path / "posters" / "a.png")
    s = vqa_constraints.load(tmp_path / "movies.csv")
    assert [x.category for x in s] == ["movies", "movies"]
    c = s[1].constraints[0]
    assert s[1].question[c.start:c.end] == "The Matrix" and s[1].answer == "1999"
    assert s[0].image.size == (120, 80)
    (tmp_path / "bad.csv").write_text("question,entity,image,answer\nWhat is this?,a cat,x.png,dog\n"
                                      "Is the cat black?,the cats,x.png,no\n")
    with pytest.warns(DatasetWarning, match="skipped 1 of 2 rows"):
        s = vqa_constraints.load(tmp_path / "bad.csv")
    assert [(x.constraints[0].word, x.meta["constraint_rule"]) for x in s] == [("the cat", "inflection")]
    assert s.skipped == [{"source": str(tmp_path / "bad.csv"), "row": 2, "reason": "constraint not located: "
                          "constraint 'a cat' is not in the question, nor is its head noun 'cat'"}]
    (tmp_path / "nocol.csv").write_text("question,image,answer\nq,x.png,a\n")
    with pytest.raises(DatasetError, match="no constraint column"):
        vqa_constraints.load(tmp_path / "nocol.csv")
    with pytest.raises(DatasetError, match="does not exist"):
        vqa_constraints.load(tmp_path / "none.csv")


def test_load_samples_dispatch_and_errors(shapes_handle):
    s = load_samples("shapes", n=4, seed=1, handle=shapes_handle)
    assert len(s) == 4 and s[0].image_size == 96
    with pytest.raises(ValueError, match="unknown dataset"):
        load_samples("coco", n=3)
    with pytest.raises(ValueError, match=r"needs \['questions', 'images'\]"):
        load_samples("gqa", n=3)
    with pytest.raises(ValueError, match="does not take"):
        load_samples("scienceqa", problems="p.json", images="i", colour="red")
    assert np.all([x.category in microscope.data.shapes.CATEGORIES for x in s])


def test_gqa_layout_of_shapes_samples_gives_the_same_roles_and_answers(shapes_handle, tmp_path):
    """The GQA loader, fed the Shapes world written in GQA's layout, reproduces the samples."""
    from microscope import knockout as ko
    from microscope.data import shapes
    from tests.gqa_fixture import write_gqa

    h = shapes_handle
    orig = shapes.generate(24, 9)
    files = write_gqa(orig, tmp_path)
    loaded = load_samples("gqa", handle=h, **files)
    by_id = {s.id: s for s in loaded}
    assert set(by_id) == {s.id for s in orig}
    loaded = [by_id[s.id] for s in orig]
    assert [s.category for s in loaded] == [s.category for s in orig]
    a, b = microscope.prepare_samples(h, orig), microscope.prepare_samples(h, loaded)
    assert (a.roles == b.roles).all()
    pa, pb = ko.predict(h, orig, progress=False), ko.predict(h, loaded, progress=False)
    assert (pa.correct.values == pb.correct.values).all()
    assert np.allclose(pa.p_answer, pb.p_answer, atol=1e-6)
    for o, s in zip(orig, loaded):  # boxes cover at least the patches the objects' pixels touch
        if o.referred and len(o.referred) == len(o.constraints):
            assert set(o.referred_patches()) <= set(s.referred_patches())


def test_resized_box_patches_map_the_whole_image_onto_the_grid():
    from microscope.grid import resized_box_patches

    # 120 x 80 onto 3 rows x 4 cols: cells of 30 x 26.7 px, nothing cropped
    assert resized_box_patches((0, 0, 10, 10), 120, 80, 3, 4) == (0,)
    assert resized_box_patches((20, 0, 30, 10), 120, 80, 3, 4) == (0,)
    assert resized_box_patches((20, 40, 100, 80), 120, 80, 3, 4) == (4, 5, 6, 7, 8, 9, 10, 11)
    assert resized_box_patches((100, 0, 120, 80), 120, 80, 3, 4) == (3, 7, 11)


def test_gqa_boxes_on_a_dynamic_resolution_grid(gqa_files, handles):
    """Qwen2-VL keeps the image's aspect ratio: the sample's grid is the (rows, cols) token grid
    its own processor gives the 120 x 80 image, and the referred boxes map onto it."""
    from microscope import knockout as ko
    from microscope.grid import resized_box_patches, token_grid

    h = handles["qwen2_vl"]
    d = gqa_files
    s = load_samples("gqa", handle=h, questions=d / "questions.json", images=d / "images",
                     scene_graphs=d / "graphs.json")
    rows, cols = token_grid(h, 120, 80)
    assert s[0].grid == (rows, cols) and rows < cols  # landscape stays landscape
    assert s[0].referred_patches() == tuple(sorted(set(resized_box_patches((20, 0, 30, 10), 120, 80, rows, cols))
                                                   | set(resized_box_patches((20, 40, 100, 80), 120, 80, rows,
                                                                             cols))))
    batch = microscope.prepare_samples(h, s)
    assert int(batch.inputs["image_grid_thw"][0][1]) // 2 == rows  # the processor's own grid
    pos = grid.image_patch_positions(h, batch, 0, s[0].grid)
    assert len(pos) == rows * cols
    src, _ = ko.edge_masks(h, batch, "related-image↛question", [x.referred_patches() for x in s])
    assert src[0].sum().item() == len(s[0].referred_patches())
    with pytest.raises(ValueError, match="grid but"):
        grid.image_patch_positions(h, batch, 0, (cols, rows))


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_anyres_base_view_squashes_the_whole_image(handles, name, gqa_files):
    """The anyres base view is the whole image resized to a square (no crop): a dark box in the
    left margin of a 120 x 80 image darkens exactly the cells resized_box_patches names, where a
    CLIP centre crop would have cut it off — and a GQA sample's grid says so."""
    from microscope.grid import resized_box_patches

    h = handles[name]
    img = np.full((80, 120, 3), 255, np.uint8)
    img[0:20, 0:15] = 0
    px = h.processor.image_processor(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"]
    base = px[0, 0].mean(0)  # (56, 56): the first view, channels averaged
    cells = base.reshape(4, 14, 4, 14).amin(dim=(1, 3)).flatten()
    dark = tuple(int(i) for i in (cells < 0).nonzero().flatten())
    assert dark == resized_box_patches((0, 0, 15, 20), 120, 80, 4, 4) == (0,)
    assert box_patches((0, 0, 15, 20), 120, 80, 4) == ()  # the crop rule would have lost it
    d = gqa_files
    s = load_samples("gqa", handle=h, questions=d / "questions.json", images=d / "images",
                     scene_graphs=d / "graphs.json")
    # cup (20, 0, 30, 10) and table (20, 40, 100, 80) of the 120 x 80 image on the squashed 4 x 4 grid
    assert s[0].grid == (4, 4) and s[0].referred_patches() == (0, *range(8, 16))
    batch = microscope.prepare_samples(h, s[:1])
    assert len(grid.image_patch_positions(h, batch, 0, s[0].grid)) == 16


def test_llava15_crop_rule_matches_its_processor(handles):
    """LLaVA-1.5's CLIP preprocessing resizes the shortest edge and centre-crops: a dark box at the
    crop's left edge darkens exactly the cells box_patches names (the squash rule would say two)."""
    from microscope.grid import resized_box_patches

    h = handles["llava15"]
    img = np.full((80, 120, 3), 255, np.uint8)
    img[0:20, 20:35] = 0
    px = h.processor.image_processor(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"]
    cells = px[0].mean(0).reshape(4, 14, 4, 14).amin(dim=(1, 3)).flatten()
    dark = tuple(int(i) for i in (cells < 0).nonzero().flatten())
    assert dark == box_patches((20, 0, 35, 20), 120, 80, 4) == (0,)
    assert resized_box_patches((20, 0, 35, 20), 120, 80, 4, 4) == (0, 1)
