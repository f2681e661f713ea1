"""support/sms_data.py: the loader reads the real format (embedded, UCI download, local file), balances and splits
as the book does, and encodes messages keeping their start."""

import os
import zipfile
from collections import Counter

import pytest
from conftest import shared_data

from support import sms_data as classifier


def write(tmp_path, text, name="sms.tsv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


# ---------------------------------------------------------------------------------------------- the loader


def test_reads_the_collection_format_header_tabs_in_text_and_unicode(tmp_path):
    text = (
        "Label\tSMS\r\n"
        "ham\tOk lar... Joking wif u oni...\r\n"
        "spam\tWINNER!! £900 prize\tcall 09061701461 now\r\n"  # a tab inside the message stays in it
        "ham\tZoë says 👋 &lt;#&gt; see you at the café\r\n"
        "\n"
    )
    messages = classifier.read_sms_file(write(tmp_path, text))
    assert messages == [
        classifier.Message("Ok lar... Joking wif u oni...", 0),
        classifier.Message("WINNER!! £900 prize\tcall 09061701461 now", 1),
        classifier.Message("Zoë says 👋 &lt;#&gt; see you at the café", 0),
    ]


def test_reads_the_uci_file_which_has_no_header(tmp_path):
    messages = classifier.read_sms_file(
        write(tmp_path, "ham\tGo until jurong point\nspam\tFree entry in 2 a wkly comp")
    )
    assert [m.label for m in messages] == [0, 1] and messages[0].text == "Go until jurong point"


@pytest.mark.parametrize(
    "content, problem",
    [
        ("", "holds no messages"),
        ("Label\tSMS\n\n", "holds no messages"),
        ("ham\tfine\nSpam\tWIN NOW\n", "line 2 .* label 'Spam'.*'ham' or 'spam'"),
        ("ham\tfine\nneutral\tok\n", "line 2 .* label 'neutral'"),
        ("ham fine, no tab here\n", "line 1 .* no tab"),
        ("ham\tfine\nspam\t   \n", "line 2 .* empty message"),
        (b"ham\tfine\nspam\tcaf\xe9 prize\n", "line 2 .* not valid UTF-8"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, content, problem):
    with pytest.raises(ValueError, match=problem):
        classifier.read_sms_file(write(tmp_path, content))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="give --dataset an existing label<TAB>text file"):
        classifier.read_sms_file(str(tmp_path / "nope.tsv"))


def test_real_collection_balanced_and_split_like_the_published_run():
    messages = classifier.read_sms_file(shared_data("sms_spam_collection.tsv"))
    assert len(messages) == 5574
    assert sum(m.label == 0 for m in messages) == 4827 and sum(m.label == 1 for m in messages) == 747
    assert max(len(m.text.encode("utf-8")) for m in messages) > 512  # some are longer than the tiny base's block
    balanced = classifier.balance_classes(messages)
    assert sum(m.label == 0 for m in balanced) == sum(m.label == 1 for m in balanced) == 747
    ham = Counter(m for m in messages if m.label == 0)
    assert not Counter(m for m in balanced if m.label == 0) - ham  # a sample of the ham, no message drawn twice
    spam = [m for m in messages if m.label == 1]
    assert [m for m in balanced if m.label == 1] == spam  # every spam message is kept, in order
    train, val, test = classifier.split_messages(balanced)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)  # the book's 70/10/20 of 1,494
    assert sorted(train + val + test) == sorted(balanced)
    assert classifier.split_messages(classifier.balance_classes(messages)) == (
        train,
        val,
        test,
    )  # fixed seed: the same split every time


def test_embedded_sample_loads_balanced():
    messages = classifier.load_messages()
    assert len(messages) == 600 and sum(m.label for m in messages) == 300
    train, val, test = classifier.split_messages(classifier.balance_classes(messages))
    assert (len(train), len(val), len(test)) == (420, 60, 120)


def test_balancing_undersamples_the_larger_class_and_needs_both():
    messages = [classifier.Message(f"ham {i}", 0) for i in range(30)] + [
        classifier.Message(f"spam {i}", 1) for i in range(10)
    ]
    balanced = classifier.balance_classes(messages, seed=1)
    assert sum(m.label == 0 for m in balanced) == 10 and sum(m.label == 1 for m in balanced) == 10
    assert balanced != classifier.balance_classes(messages, seed=2)  # the seed picks which ham stay
    with pytest.raises(ValueError, match="0 spam.*both classes"):
        classifier.balance_classes(messages[:30])


def test_uci_download_is_extracted_from_the_zip(tmp_path, monkeypatch):
    payload = "ham\tI'm gonna be home soon\nspam\tURGENT! You have won a 1 week FREE membership\n"

    def fake_download(url, path):  # stands in for the network: writes the zip UCI serves
        assert url == classifier.UCI_URL
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme", "SMS Spam Collection v.1")
            archive.writestr("SMSSpamCollection", payload)
        return path

    monkeypatch.setattr(classifier, "download_file", fake_download)
    path = classifier.download_sms_collection(str(tmp_path / "downloads"))
    assert os.path.basename(path) == "SMSSpamCollection"
    assert [m.label for m in classifier.read_sms_file(path)] == [0, 1]


def test_failed_or_broken_downloads_are_clear_errors(tmp_path, monkeypatch):
    import urllib.error

    def offline(url, path):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(classifier, "download_file", offline)
    with pytest.raises(ConnectionError, match="--dataset .*SMSSpamCollection"):
        classifier.download_sms_collection(str(tmp_path / "a"))

    def not_a_zip(url, path):
        open(path, "w").write("<html>maintenance</html>")
        return path

    monkeypatch.setattr(classifier, "download_file", not_a_zip)
    with pytest.raises(ValueError, match="not a valid zip"):
        classifier.download_sms_collection(str(tmp_path / "b"))


def test_encoding_truncates_keeping_the_start_and_counts():
    from support.tokenizer import get_tokenizer

    rows, truncated = classifier.encode_messages(
        [classifier.Message("abcdef", 1), classifier.Message("ab", 0)], get_tokenizer("bytes"), 4
    )
    assert rows == [(list(b"abcd"), 1), (list(b"ab"), 0)] and truncated == 1
