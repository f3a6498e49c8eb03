"""An independent reference for Pascal VOC detection AP, written from the VOC devkit's description."""

from __future__ import annotations

import math

__all__ = ["devkit_ap"]


def devkit_ap(gt: dict, dets: dict[int, list[tuple]], eleven_point: bool) -> float:
    """Pascal VOC mAP at IoU 0.5 of ``dets`` (image id -> [(category id, x0, y0, x1, y1, score)], continuous pixels)
    against the COCO-format ``gt`` (annotations with ``difficult``), as the devkit's VOCevaldet.m computes it: boxes in
    VOC's 1-based inclusive pixels with the "+1" areas, the best-overlap rule, then the 11-point or area AP; the mean
    over the classes with a non-difficult box."""
    def voc_box(x0, y0, x1, y1):
        return x0 + 1, y0 + 1, x1, y1

    def overlap(a, b):
        iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
        ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
        if iw <= 0 or ih <= 0:
            return -math.inf
        ua = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - iw * ih
        return iw * ih / ua

    aps = []
    for cat in sorted(c["id"] for c in gt["categories"]):
        truth = {}
        for a in gt["annotations"]:
            if a["category_id"] == cat:
                x, y, w, h = a["bbox"]
                truth.setdefault(a["image_id"], []).append([voc_box(x, y, x + w, y + h), a.get("difficult", 0), False])
        npos = sum(1 for rows in truth.values() for r in rows if not r[1])
        if npos == 0:
            continue
        found = [(score, img, voc_box(*box)) for img, rows in dets.items() for c, *box, score in rows if c == cat]
        found.sort(key=lambda t: -t[0])
        tp, fp = [], []
        for _, img, box in found:
            best, jmax = -math.inf, None
            for j, row in enumerate(truth.get(img, [])):
                ov = overlap(box, row[0])
                if ov > best:
                    best, jmax = ov, j
            t = f = 0
            if best >= 0.5:
                row = truth[img][jmax]
                if not row[1]:
                    if not row[2]:
                        t, row[2] = 1, True
                    else:
                        f = 1
            else:
                f = 1
            tp.append(t)
            fp.append(f)
        ctp, cfp, rec, prec = 0, 0, [], []
        for t, f in zip(tp, fp):
            ctp, cfp = ctp + t, cfp + f
            rec.append(ctp / npos)
            prec.append(ctp / (ctp + cfp) if ctp + cfp else 0.0)
        if eleven_point:
            ap = sum(max([p for r, p in zip(rec, prec) if r >= k / 10], default=0.0) for k in range(11)) / 11
        else:
            mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
            for i in range(len(mpre) - 2, -1, -1):
                mpre[i] = max(mpre[i], mpre[i + 1])
            ap = sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])
        aps.append(ap)
    return sum(aps) / len(aps)
