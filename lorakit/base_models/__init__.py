"""Base models to adapt: the embedded pretrained ones and Llama shapes from configs."""
