"""Reserved ids of the seq2seq vocabularies, shared by the data that writes them and the model.

PAD fills every position past a sequence's length (the positions a mask excludes); GO starts
the decoder's input; EOS ends a target and stops decoding; UNK stands for a word outside the
vocabulary. The data side (`maskax.data.translation`) and the model side
(`maskax.models.seq2seq`) both import them from here, so neither imports the other.
"""

PAD, GO, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<go>", "<eos>", "<unk>")  # their strings, in id order
