"""The studio's logic, no gradio: a click's actions on one model (`actions`), the models by name
(`registry`), requests drawn together in one network call (`batching`), and results on disk (`runs`)."""
