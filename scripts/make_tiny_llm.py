"""Write assets/tiny-llm/: the offline default LLM (a tiny Llama config and a trained tokenizer).

No weights are shipped: with `pretrained_weights: false` the model is built from config.json with
random init, which is all the demo configs and tests need. The tokenizer is a byte-level BPE trained
here on the demo transcripts plus a page of everyday English, so it can spell anything (bytes) and
is efficient on the demo vocabulary. It adds no BOS/EOS by itself; the models add them, and the chat
template ends every assistant turn with EOS so a model learns to stop.

    python scripts/make_tiny_llm.py                # reads assets/demo/, rewrites assets/tiny-llm/
"""

import argparse
import gzip
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 1000
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
AUDIO_LOCATOR_TAG = "<|audioplaceholder|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, AUDIO_LOCATOR_TAG, SYSTEM, USER, ASSISTANT, END]  # ids 0..8

# System and user turns end with <|end|>, assistant turns with EOS; no BOS (the models add it).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM + "{{ message['content'] }}" + END
    + "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}" + END
    + "{% elif message['role'] == 'assistant' %}" + ASSISTANT
    + "{{ message['content'] }}{{ eos_token }}"
    + "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=REPO / "assets" / "demo",
                        help="demo data whose transcripts the tokenizer is trained on")
    parser.add_argument("--out", type=Path, default=REPO / "assets" / "tiny-llm")
    args = parser.parse_args()

    texts = demo_transcripts(args.demo) + EVERYDAY_ENGLISH.strip().splitlines()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(texts),
        unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=[AUDIO_LOCATOR_TAG, SYSTEM, USER, ASSISTANT, END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
        **MODEL_CONFIG,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    config.save_pretrained(args.out)
    print(f"wrote {args.out}: vocab {len(tokenizer)}, trained on {len(texts)} lines")


def demo_transcripts(demo_dir: Path) -> list[str]:
    """Sorted unique transcripts of every demo split, read from the Shar cut manifests."""
    manifests = sorted(demo_dir.glob("*/cuts.*.jsonl.gz"))
    if not manifests:
        raise FileNotFoundError(f"no demo manifests under {demo_dir}: "
                                "run scripts/make_demo_data.py first")
    texts = set()
    for manifest in manifests:
        with gzip.open(manifest, "rt") as f:
            texts.update(sup["text"] for line in f for sup in json.loads(line)["supervisions"])
    return sorted(texts)


def train_bpe(texts: list[str]) -> Tokenizer:
    """Byte-level BPE: every byte is in the vocabulary, so no text is ever unknown."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


EVERYDAY_ENGLISH = """
Good morning. Did you sleep well last night?
I usually get up at seven and make a cup of coffee before work.
The kitchen is small, but it gets a lot of light in the morning.
Could you pass me the salt, please?
We ran out of milk, so I will stop at the shop on the way home.
My sister lives in a little house near the river.
The bus was late again today, so I walked to the station.
It is going to rain this afternoon. Take an umbrella with you.
The children are playing in the garden with their dog.
Please close the door when you leave the room.
I read a good book about the history of the city.
He forgot his keys at the office and had to wait outside.
The weather was warm and sunny for the whole weekend.
We had soup and bread for lunch.
She plays the piano every evening after dinner.
Turn left at the next corner and you will see the bakery.
The train leaves at half past nine from platform two.
Can you help me carry these boxes upstairs?
I need to buy new shoes for the winter.
The meeting has been moved to Thursday morning.
My phone battery is almost empty. Do you have a charger?
They painted the fence white last summer.
The cat is sleeping on the chair by the window.
Let us go for a walk in the park before it gets dark.
I like my tea with a little honey and lemon.
Our neighbors have a big apple tree in their yard.
The doctor said I should drink more water and rest.
What time does the library open on Saturday?
He is learning to ride a bicycle.
We are planning a trip to the mountains next month.
The soup is too hot, so wait a minute before you eat it.
I lost my glove somewhere between the school and the market.
Please write your name at the top of the page.
The store is closed on Sundays and holidays.
My brother works as a nurse at the hospital.
She opened the window to let in some fresh air.
The movie was long, but the ending was worth it.
Do you want to sit inside or outside?
The baby is finally asleep, so please speak quietly.
I will call you back in ten minutes.
There is a small table and two chairs on the balcony.
We need more eggs, flour and butter to bake the cake.
The road is closed because of the snow.
He always puts his wallet in the left pocket.
Could you turn down the music a little?
The flowers in the front garden are red and yellow.
I have not seen that film yet. Is it any good?
The teacher asked the students to read the first chapter.
Let me know when you are ready to leave.
The water in the lake was cold but clear.
My grandmother tells the best stories.
We watched the sunset from the top of the hill.
I am sorry, I did not hear what you said.
Can you say that again, a bit more slowly?
Thank you very much for your help.
You are welcome. It was no trouble at all.
The post office is across the street from the bank.
He drinks a glass of orange juice every morning.
This bag is heavy. What is inside it?
The lights in the hall are still on.
Please put the dishes in the sink.
The plant on the shelf needs more water.
I wrote a letter to my friend who lives abroad.
It takes twenty minutes to drive to the beach.
The dog barks whenever someone rings the bell.
We have a math test on Friday.
Her favorite color is green, and his is blue.
The shop sells fruit, vegetables and fresh bread.
I cannot find my pen. Have you seen it?
The floor is wet, so be careful.
Dinner will be ready in half an hour.
The old clock in the hall still keeps good time.
They moved into a new apartment last week.
Let us meet at the cafe at noon.
The sky turned orange as the sun went down.
I need to charge the car before the long drive.
Please keep the receipt in case you want to return it.
He fixed the broken chair with some glue and a nail.
We sat by the fire and talked until midnight.
Could you show me how this machine works?
The price of vegetables went up this year.
My friend gave me a book for my birthday.
It is quiet here in the early morning.
The baker starts work at four in the morning.
Do not forget to lock the back door.
There are three apples and two oranges in the bowl.
The museum is free on the first Sunday of the month.
She smiled and waved from across the road.
We should leave early to avoid the traffic.
The window in the bedroom does not close properly.
I made a list of things we need for the party.
He counted the coins and put them in a jar.
The river is high after all the rain.
Please wash your hands before dinner.
My computer is slow today. I think it needs a restart.
The birds start singing as soon as it gets light.
Is there a pharmacy near here?
Walk straight ahead for about five minutes.
The hotel room had a view of the harbor.
I will bring a salad and some drinks.
The kids built a tower out of wooden blocks.
We planted tomatoes and beans in the spring.
The new bridge will open next year.
She keeps her notes in a blue folder.
The radio said it would be windy tonight.
Can I borrow your ladder for the weekend?
Sure, just bring it back when you are done.
The cups are in the cupboard above the sink.
He sent me a photo of the view from his window.
The exam was easier than I expected.
I like to listen to music while I cook.
The coffee machine at work is broken again.
Our team won the game by two points.
The museum has a room full of old maps.
Please turn off the lights when you go to bed.
I usually take the stairs instead of the elevator.
The market is busy on Saturday mornings.
We found a small cafe with very good cake.
My shoes are wet from the rain.
He reads the news on his phone at breakfast.
The garden looks lovely in the summer.
There is a mistake on the second page.
I will check the time of the last bus.
They are building a new school near the park.
Please speak a little louder. I cannot hear you.
The soup needs a bit more salt.
Can you pick up the children from school today?
The red car in front of the house belongs to our neighbor.
She bought a yellow raincoat and black boots.
It was so cold that the pond froze over.
I think we are lost. Let us look at the map.
The doctor will see you in a few minutes.
The cake is in the oven and smells wonderful.
He always forgets where he parked the car.
We have enough chairs for eight people.
The library has a quiet room for reading.
Please bring your own cup to the meeting.
The phone rang twice and then stopped.
I need a new battery for the clock.
The dog likes to sleep in the sun.
Could you open the window a little?
My favorite season is autumn, when the leaves turn brown and red.
The children counted from one to ten and then ran to hide.
There are seven days in a week and twelve months in a year.
Two and two make four, and three and four make seven.
The answer is five, not six.
How many people are coming to dinner?
I think about twelve, but maybe more.
Where did you put the scissors?
They are in the second drawer on the left.
What is the weather like today?
It is cloudy, with a chance of rain later.
Which bus goes to the city center?
Take number nine and get off at the third stop.
Why is the door open?
Someone forgot to close it when they came in.
When does the film start?
It starts at eight, so we have time for dinner first.
Who left these books on the table?
I did. I will put them back on the shelf.
How long does it take to boil an egg?
About eight minutes for a hard egg.
Is this seat free?
Yes, please sit down.
What color is your new bike?
It is dark green with a white seat.
The sky is blue and the grass is green.
Snow is white and coal is black.
A lemon is yellow and a cherry is red.
The little boy held his mother's hand.
We listened to the rain on the roof.
She finished her homework and went outside to play.
He put on his coat and hat and went for a walk.
The shop on the corner sells newspapers and sweets.
I have a meeting at ten and lunch at one.
We can talk about it tomorrow.
That sounds like a good plan.
I am not sure, let me think about it.
Of course, I would be happy to help.
Please wait here while I get the car.
The machine makes a strange noise when it starts.
The students sat in a circle on the floor.
Our flight was delayed by two hours.
The nights are getting longer now.
Let us open the box and see what is inside.
Put the blue cup on the table next to the plate.
Pick up the toys and put them in the basket.
Move the lamp a little to the right.
Turn on the heater, it is cold in here.
Set an alarm for six in the morning.
Close the curtains, the sun is too bright.
Give me a minute to find my glasses.
Show me the photos from your trip.
Count the plates and tell me how many we have.
Say hello to your parents for me.
Listen carefully and repeat after me.
Write the numbers from one to twenty in a row.
Everyone clapped at the end of the song.
The small shop sells fresh fish every Friday.
I keep a spare key under the flower pot.
We will paint the kitchen a light yellow.
The bread is still warm from the oven.
The hill behind the village is steep but short.
He spoke slowly so that everyone could follow.
The bell rang and the children ran outside.
I wish you a good trip and a safe return.
Have a nice evening and see you tomorrow.
Goodbye, and thank you for everything.
"""


if __name__ == "__main__":
    main()
