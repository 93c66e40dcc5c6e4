"""A small region proposal package for the tests' Faster R-CNN nets (``module: 'rpn.proposal_layer'``)."""
