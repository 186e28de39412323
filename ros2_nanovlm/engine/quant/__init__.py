"""Weight quantization, kept out of the model code (the gpt-fast habit): functions that turn a
float weight into a packed 4-bit one and back. No CUDA needed here."""
