"""Generate music (MusicGen, MAGNeT) or sound (AudioGen) from text on MLX (the `mlx_musicgen.generate` command;
generate.py runs it too).

    mlx_musicgen.generate --text "80s pop track with bassy drums and synth" --duration 8 --output out.wav
    mlx_musicgen.generate --text "lofi" --text "epic strings" --output clips/take.wav     # take-1.wav, take-2.wav
    mlx_musicgen.generate --prompts-file prompts.txt --duration 30 --stream --play
    mlx_musicgen.generate --model facebook/musicgen-melody --text "lofi" --melody tune.wav --output take.wav
    mlx_musicgen.generate --model facebook/audiogen-medium --text "dog barking in the rain" --output dog.wav
"""

import argparse
import dataclasses
import secrets
import sys
from pathlib import Path

import numpy as np

from .audio import NORMALIZATIONS, ProgressiveWriter, check_prompt, read_audio
from .cli import (add_checkpoint_options, add_dtype_option, add_generation_options, generation_config, player,
                  progress_bar, run_main)
from .clips import check_clip_output, clip_settings, write_clip
from .lora import read_adapter_config
from .model import DTYPES
from .musicgen import MusicGen


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="facebook/musicgen-small",
                   help="Hub id (facebook/musicgen-small, facebook/audiogen-medium, ...), a folder in transformers' "
                        "or audiocraft's layout, or a converted folder (default: facebook/musicgen-small)")
    p.add_argument("--text", action="append",
                   help="what the music should be (repeat for several clips); leave out for unconditional music")
    p.add_argument("--prompts-file", help="a text file with one description per line, one clip each")
    p.add_argument("--audio-prompt", help="a wav/flac/ogg file to continue (the output starts with it)")
    p.add_argument("--melody", help="a wav/flac/ogg file whose tune the music follows (melody models only)")
    p.add_argument("--output", default="musicgen.wav",
                   help="a .wav or .flac file (default musicgen.wav); several clips are numbered NAME-1, NAME-2, ...")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output (and its sidecar NAME.json) if either exists")
    add_generation_options(p)
    p.add_argument("--adapter", help="LoRA adapters to apply: a fine-tune's output folder (finetune.py "
                   "--adapter-path), a PEFT adapter folder, or the Hub id of one")
    add_dtype_option(p)
    add_checkpoint_options(p)
    p.add_argument("--bits", choices=["16", "24", "float"], default="16", help="sample format (default 16)")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default="peak",
                   help="peak: to -1 dBFS (default); loudness: to -14 LUFS (ITU-R BS.1770); none: as generated")
    p.add_argument("--batch-size", type=int, default=4, help="clips generated together (default 4)")
    p.add_argument("--stream", action="store_true",
                   help="write the .wav as it is made (a valid, growing file), then normalise it at the end")
    p.add_argument("--play", action="store_true",
                   help="play while generating (the first clip), if sounddevice and an output device exist")
    p.add_argument("--chunk", type=float, default=1.0, help="seconds of audio per streamed chunk (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def read_texts(args: argparse.Namespace) -> list[str | None]:
    """The descriptions to make, one clip each: --text (repeated), then --prompts-file lines; [None] when neither
    (one unconditional clip). An empty description means unconditional music, said once."""
    texts = list(args.text or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist.")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"prompts file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                             f"{e.start}): save it as UTF-8, one description per line.") from None
        texts += [line.strip() for line in lines if line.strip()]
        if not texts:
            raise ValueError(f"prompts file {path} has no descriptions (one per line).")
    if not texts:
        return [None]
    for i, text in enumerate(texts):
        if not text.strip():
            which = "the text is" if len(texts) == 1 else f"text {i + 1} is"
            print(f"note: {which} empty: generating unconditional music.", file=sys.stderr)
    return [t if t.strip() else None for t in texts]


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, count + 1)]


def run(args: argparse.Namespace) -> None:
    # Everything that can be checked without the model fails here, before the (slow) load.
    texts = read_texts(args)
    outputs = [check_clip_output(p, overwrite=args.overwrite, bits=args.bits)
               for p in output_paths(args.output, len(texts))]
    if args.stream and any(p.suffix.lower() != ".wav" for p in outputs):
        raise ValueError("--stream writes WAV files (their header can be kept valid as they grow): use .wav.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if not args.chunk > 0:
        raise ValueError(f"--chunk must be a positive number of seconds, got {args.chunk}.")
    config = generation_config(args)
    config.check()
    if args.audio_prompt:
        check_prompt(*read_audio(args.audio_prompt), f"audio prompt {args.audio_prompt}")
    if args.melody:
        check_prompt(*read_audio(args.melody, "melody"), f"melody {args.melody}")
    if args.adapter:
        read_adapter_config(Path(args.adapter))  # before the load
    # generate_stream checks top_k against its vocabulary
    model = MusicGen.from_pretrained(args.model, dtype=DTYPES.get(args.dtype), adapter=args.adapter,
                                     checkpoint_format=args.checkpoint_format, text_encoder=args.text_encoder)
    # the family's length and stride where none was given; the seed is recorded, so that every clip can be made
    # again
    config = config.for_model(model.shape.kind, command=True, window_seconds=model.shape.window_seconds)
    config = dataclasses.replace(config, seed=config.seed if config.seed is not None else secrets.randbits(31))
    speaker = player(model.sampling_rate, model.audio_channels) if args.play else None
    for start in range(0, len(texts), args.batch_size):
        batch = texts[start : start + args.batch_size]
        paths = outputs[start : start + args.batch_size]
        settings = clip_settings(model=str(args.model), adapter=args.adapter, config=config, batch=batch,
                                 audio_prompt=args.audio_prompt, melody=args.melody, normalize=args.normalize,
                                 sampling_rate=model.sampling_rate)
        clips = make_clips(model, args, config, batch, paths, speaker)
        for i, (path, audio) in enumerate(zip(paths, clips)):
            sidecar = write_clip(path, audio, {"text": batch[i], "batch_index": i, **settings}, model.sampling_rate,
                                 bits=args.bits, normalization=args.normalize)
            seconds = audio.shape[-1] / model.sampling_rate
            print(f"wrote {path} and {sidecar.name} ({seconds:.2f} s, {model.sampling_rate} Hz, "
                  f"{audio.shape[0]} channel(s))", file=sys.stderr)
    if speaker is not None:
        speaker.close()


def make_clips(model, args, config, batch, paths, speaker) -> list:
    """Generate one batch of clips as a stream: with --stream each chunk is appended to its file at once, with
    --play the first clip's chunks are played; the whole clips are returned for normalising and writing."""
    conditional = any(t is not None for t in batch)
    bar, update = progress_bar(config.duration, "generating", disable=args.quiet)
    writers = [ProgressiveWriter(p, model.sampling_rate, model.audio_channels, args.bits) for p in paths] \
        if args.stream else []
    pieces: list[list] = [[] for _ in batch]
    try:
        with bar:
            for chunk in model.generate_stream(
                [t or "" for t in batch] if conditional else None,
                num_samples=len(batch),
                audio_prompt=[args.audio_prompt] * len(batch) if args.audio_prompt else None,
                melody=args.melody,
                chunk_duration=args.chunk,
                config=config,
                progress=update,
            ):
                for i, item in enumerate(chunk):
                    pieces[i].append(item)
                    if writers:
                        writers[i].write(item)
                if speaker is not None:
                    speaker.play(chunk[0])
    finally:
        for writer in writers:
            writer.close()
    return [np.concatenate(p, axis=-1) for p in pieces]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(lambda: run(args), args.debug)


if __name__ == "__main__":
    main()
