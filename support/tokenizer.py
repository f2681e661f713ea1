"""
Two tokenizers with .name, .vocab_size, .eot_token, .encode(text), .decode(ids): "gpt2" (OpenAI's BPE through tiktoken,
what GPT-2's weights expect) and "bytes" (UTF-8 bytes 0..255 and <|endoftext|> = 256: no file, any text round-trips,
so the tiny models use it). In both the text "<|endoftext|>" encodes to the end-of-text token.
"""

EOT_TEXT = "<|endoftext|>"


class ByteTokenizer:
    name = "bytes"
    vocab_size = 257
    eot_token = 256

    def encode(self, text):
        ids = []
        for i, piece in enumerate(text.split(EOT_TEXT)):
            if i > 0:
                ids.append(self.eot_token)
            ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids):
        out, run = [], bytearray()
        for i in ids:
            if i == self.eot_token:
                out.append(run.decode("utf-8", errors="replace") + EOT_TEXT)
                run = bytearray()
            else:
                run.append(i)
        # a model may emit a byte sequence that is not valid UTF-8; show it as U+FFFD rather than fail
        return "".join(out) + run.decode("utf-8", errors="replace")


class BPETokenizer:
    name = "gpt2"

    def __init__(self):
        import tiktoken

        self.enc = tiktoken.get_encoding("gpt2")
        self.vocab_size = self.enc.n_vocab  # 50257
        self.eot_token = self.enc.eot_token  # 50256

    def encode(self, text):
        return self.enc.encode(text, allowed_special={EOT_TEXT})

    def decode(self, ids):
        return self.enc.decode(list(ids))


def get_tokenizer(name):
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return BPETokenizer()
    raise ValueError(f"unknown tokenizer {name!r}: use 'bytes' or 'gpt2'")
