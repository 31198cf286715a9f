"""minunet.figures: the two pictures of a run folder, drawn with matplotlib.

    curves.png        loss (train, validation) and validation scores per epoch, on integer
                      epoch ticks, with the best epoch (the one best.safetensors holds) marked
    predictions.png   a few validation images: image | ground truth | prediction, the masks in
                      the colours of `minunet predict`'s <name>_color.png (class 0 black, as
                      there), pixels that are not scored in white, and a legend that names
                      each class by its colour

The figures are matplotlib Figure objects saved directly, without pyplot: drawing them
neither opens a window nor changes the matplotlib backend of the process that trains.
"""
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from minunet.predict import colorize, palette, to_display


def plot_curves(path, history, class_names=None, best_epoch=None):
    """Loss and validation scores per epoch (mean Dice, mIoU, pixel accuracy, and each class's
    Dice, dashed, in its predictions.png colour, under its name or its index); `best_epoch` is
    drawn as a vertical line, with a star on its mean Dice."""
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(12, 4))
    ax_loss, ax_score = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    # the summary scores in grays, so that the colours belong to the classes alone
    for key, label, style, gray in (("mean_dice", "mean Dice", "o-", "0.1"), ("mean_iou", "mean IoU", "s-", "0.45"),
                                    ("pixel_accuracy", "pixel accuracy", "^-", "0.7")):
        ax_score.plot(epochs, [r[key] for r in history], style, color=gray, label=label)
    num_classes = len(history[-1]["dice"])
    names = class_names or [f"class {k}" for k in range(num_classes)]
    for k, (name, colour) in enumerate(zip(names, palette(num_classes) / 255.0)):  # predictions.png's colours
        ax_score.plot(epochs, [r["dice"][k] for r in history], "--", color=colour, linewidth=1, label=f"Dice {name}")
    ax_score.set(xlabel="epoch", title="validation", ylim=(0, 1))
    for ax in (ax_loss, ax_score):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if best_epoch is not None:
            ax.axvline(best_epoch, color="0.4", linestyle=":", linewidth=1.5, label=f"best epoch {best_epoch}")
    if best_epoch is not None:
        best = next(r for r in history if r["epoch"] == best_epoch)
        ax_score.plot([best_epoch], [best["mean_dice"]], "*", color="0.1", markersize=14)
    ax_loss.legend()
    ax_score.legend(fontsize="small", ncol=2 if num_classes > 8 else 1, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot_predictions(path, samples, num_classes, class_names=None):
    """Rows of image | ground truth | prediction, for (image, target, prediction) triples; a
    legend below names each class's colour (and white, where the ground truth is not scored)."""
    names = list(class_names) if class_names else [f"class {k}" for k in range(num_classes)]
    handles = [Patch(facecolor=c, edgecolor="0.5", label=f"{k}: {name}")
               for k, (c, name) in enumerate(zip(palette(num_classes) / 255.0, names))]
    if any(((y < 0) | (y >= num_classes)).any() for _, y, _ in samples):
        handles.append(Patch(facecolor="white", edgecolor="0.5", label="not scored"))
    legend_height = 0.35 * _legend_rows(len(handles))  # inches
    fig = Figure(figsize=(9, 3 * len(samples) + legend_height))
    axes = fig.subplots(len(samples), 3, squeeze=False)
    for row, (x, y, pred) in zip(axes, samples):
        panels = (to_display(x), colorize(y, num_classes), colorize(pred, num_classes))
        for ax, img, title in zip(row, panels, ("image", "ground truth", "prediction")):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title)
            ax.axis("off")
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), LEGEND_COLUMNS), frameon=False)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=80)


LEGEND_COLUMNS = 6


def _legend_rows(entries):
    return -(-entries // LEGEND_COLUMNS)
