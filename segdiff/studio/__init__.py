"""The studio's logic, no gradio: a click's actions on one model (`actions`), the models by name
(`registry`), and results on disk (`runs`)."""
