"""The engine layer: PyTorch and OpenCV only, no Ray, no HTTP.

Import what you need from its modules (``serve_app.engine.engine.Engine``,
``serve_app.engine.types.EnhanceResult``): this package imports nothing, so the light
modules (``types``, ``weights``) load without torch.
"""
