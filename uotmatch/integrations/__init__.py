"""Doors into the frameworks where detectors are trained: import the one you need.

* :mod:`uotmatch.integrations.torchvision`: ``use_assigner(model, assigner)`` for
  torchvision's ``FCOS`` and ``RetinaNet``.
* :mod:`uotmatch.integrations.ultralytics`: ``TaskAssigner(assigner)``, a drop-in for
  Ultralytics' ``TaskAlignedAssigner``, ``trainer(assigner)`` for ``YOLO(...).train`` and
  ``rtdetr_trainer(matcher)`` for ``RTDETR(...).train``.
* :mod:`uotmatch.integrations.transformers`: ``use_matcher(model, matcher, loss=...)`` for
  Hugging Face's DETR-family detectors (DETR, Deformable, Conditional, DAB, RT-DETR v1/v2,
  D-FINE, LW-DETR).
* :mod:`uotmatch.integrations.rfdetr`: ``use_matcher(criterion, matcher)`` for RF-DETR's
  criterion (group DETR).

DETR-family codebases used as published (DETR, Deformable-DETR, DINO) need no adapter: the
matchers of :mod:`uotmatch.detection` take their ``(outputs, targets)`` (see the docs'
Integrations page). Nothing here is imported by ``uotmatch`` itself: each module imports its
framework.
"""
