"""Doors into the frameworks where detectors are trained: import the one you need.

* :mod:`uotmatch.integrations.torchvision`: ``use_assigner(model, assigner)`` for
  torchvision's ``FCOS`` and ``RetinaNet``.
* :mod:`uotmatch.integrations.ultralytics`: ``TaskAssigner(assigner)``, a drop-in for
  Ultralytics' ``TaskAlignedAssigner``, and ``trainer(assigner)`` for ``YOLO(...).train``.

DETR-family codebases (DETR, Deformable-DETR, DINO, RT-DETR) need no adapter: the matchers of
:mod:`uotmatch.detection` take their ``(outputs, targets)`` (see the docs' Integrations page).
Nothing here is imported by ``uotmatch`` itself: each module imports its framework.
"""
