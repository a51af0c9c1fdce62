"""New data drawn by a model: image-mask pairs from bent masks (`pairs`), and volumes from label volumes
(`volumes`)."""
