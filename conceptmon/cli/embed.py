"""``conceptmon embed`` and ``conceptmon plot``."""
from __future__ import annotations

from pathlib import Path

import click

from . import main
from .common import config_option, fail_cleanly, find_out, log_to_stderr, out_option, parse_epochs, split_csv

anchors_option = click.option(
    "--anchors", default=None, metavar="WORD,WORD",
    help="Anchor words placed in the same space, kept for later calls; auto: the most frequent top-1 concepts; "
         "none: no anchors (default: the anchors given before, else embedding.anchors, else automatic).",
)


@main.command("embed")
@config_option
@out_option
@anchors_option
@click.option("--encoder", default=None, metavar="minilm|clip:NAME",
              help="Text encoder: minilm (offline) or clip:<hf name or folder> (default: embedding.encoder).")
@click.option("--temperature", type=float, default=None,
              help="Softmax temperature T over the top-k scores (default: embedding.temperature, 1).")
@click.option("--map-fit", type=click.Choice(["vocabulary", "neurons"]), default=None,
              help="Fit the 2-D map on the concept vocabulary + anchors (default) or on all neurons.")
@click.option("--placement", type=click.Choice(["mean", "transform"]), default=None,
              help="Place neurons at the weighted mean of their concepts' map positions (default) "
                   "or with UMAP.transform (slow).")
@click.option("--map-method", type=click.Choice(["umap", "pca"]), default=None,
              help="2-D projection: umap (default) or pca (instant, linear).")
@click.option("--device", default=None, help="Device for the text encoder (default: the config's device).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache for text vectors and fitted maps (default: the config's cache_dir, else the user cache, "
                   "~/.cache/conceptmon or $CONCEPTMON_CACHE).")
@click.option("--force", is_flag=True, help="Recompute even when the outputs are up to date.")
@fail_cleanly
def embed_cmd(config_path, out, anchors, encoder, temperature, map_fit, placement, map_method, device, cache_dir,
              force):
    """Place every neuron of every dissected epoch, and any anchor word, in one text-embedding
    space and on one fixed 2-D map (OUT/embed/).

    Settings not given here come from the config the run was dissected with.
    Example: conceptmon embed --out runs/r1 --anchors windmill,field
    """
    from ..embedding import embed_run

    embed_run(
        find_out(config_path, out), anchors=split_csv(anchors), encoder=encoder, temperature=temperature,
        map_fit=map_fit, placement=placement, map_method=map_method, device=device, cache_dir=cache_dir,
        force=force, log=log_to_stderr,
    )


@main.command("plot")
@config_option
@out_option
@anchors_option
@click.option("--figure", "figure_names", default=None, metavar="map|categories|retention|compare",
              help="The paper's figures by name (comma-separated): map (Figs. 3/14), categories (4/14), "
                   "retention (5b), compare (6/16, needs --compare). Default: per-layer animated maps.")
@click.option("--compare", "compare_with", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The run to compare with for --figure compare (e.g. the robust run).")
@click.option("--labels", default=None, help="Names of the two runs for --figure compare (default: their run names).")
@click.option("--format", "formats", default="html,png", show_default=True, metavar="html,png,svg",
              help="Files to write for --figure: interactive HTML and/or static PNG/SVG (needs kaleido).")
@click.option("--neurons", default=None, metavar="LAYER:N,...",
              help="Neurons to follow: coloured trajectories on the map and cards with top images.")
@click.option("--layers", default=None, metavar="L1,L2", help="Layers to draw (default: all).")
@click.option("--epochs", default=None, metavar="E1,E2", help="Epochs to include (default: all; for --figure: "
                                                               "a few evenly spaced).")
@fail_cleanly
def plot_cmd(config_path, out, anchors, figure_names, compare_with, labels, formats, neurons, layers, epochs):
    """Interactive maps (one frame per epoch) under OUT/plots/, or with --figure the paper's
    figures as HTML and PNG/SVG; embeds first when needed.

    Example: conceptmon plot --out runs/r1 --anchors windmill,field --neurons layer4:479,layer4:256
    Example: conceptmon plot --out runs/std --figure compare --compare runs/robust --format html,svg
    """
    from ..plots import figure_run, parse_neuron_refs, plot_run

    out = find_out(config_path, out)
    if figure_names is None:
        for name, value in (("--compare", compare_with), ("--labels", labels)):
            if value is not None:
                raise click.UsageError(f"{name} is for --figure compare")
        plot_run(out, anchors=split_csv(anchors), neurons=parse_neuron_refs(neurons), layers=split_csv(layers),
                 epochs=parse_epochs(epochs), log=log_to_stderr)
        return
    figure_run(out, figure_names, compare=compare_with, labels=tuple(split_csv(labels)) if labels else None,
               anchors=split_csv(anchors), neurons=parse_neuron_refs(neurons), layers=split_csv(layers),
               epochs=parse_epochs(epochs), formats=formats, log=log_to_stderr)
