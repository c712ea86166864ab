"""CO3Dv2's object categories and the groups of them that upstream names."""

# the 51 CO3Dv2 categories, in the order upstream's demo loops over them for '-c all'
CO3D_ALL_CATEGORIES = (
    "donut", "apple", "hydrant", "vase", "cake", "ball", "bench", "suitcase", "teddybear", "plant",
    "broccoli", "orange", "toytruck", "book", "toytrain", "mouse", "toaster", "skateboard", "bowl",
    "remote", "sandwich", "bottle", "carrot", "motorcycle", "car", "keyboard", "chair", "handbag",
    "toybus", "toyplane", "backpack", "parkingmeter", "cup", "baseballglove", "frisbee", "stopsign",
    "hotdog", "laptop", "wineglass", "umbrella", "pizza", "kite", "couch", "hairdryer", "toilet",
    "cellphone", "tv", "microwave", "bicycle", "banana", "baseballbat",
)

# the 10 categories upstream released SparseFusion weights for ('-c all_ten')
CO3D_ALL_TEN = ("donut", "apple", "hydrant", "vase", "cake", "ball", "bench", "suitcase", "teddybear", "plant")

CATEGORY_GROUPS = {"all": CO3D_ALL_CATEGORIES, "all_ten": CO3D_ALL_TEN}


def expand_categories(category):
    """Return the list of categories a name stands for: a group ('all', 'all_ten'), a list or a
    comma-separated string of names and groups, or one name."""
    if isinstance(category, str) and "," in category:
        category = category.split(",")
    if isinstance(category, (list, tuple)):
        return [name for item in category for name in expand_categories(item)]
    return list(CATEGORY_GROUPS.get(category, (category,)))
