"""The method (design section 2), free of files and tracking: per-class generators, the
replay drawn from them, class prompts, the probabilistic head, the classifier they make and
the metrics it is judged by.
"""
